"""Character-level tokenizer: each distinct character of the training text is one token.

nanoGPT's `shakespeare_char` (data/shakespeare_char/prepare.py): `chars = sorted(set(text))`,
id i is chars[i], so a model trained here reads the same ids as one trained there. No merges,
no special tokens; a character outside the vocabulary is dropped on encode, as HF `tokenizers`
does for a BPE model without an unknown token (which is how `save_tokenizer` writes this one).
"""

from __future__ import annotations

from collections.abc import Iterable, Set
from typing import Literal

from tinyformers.errors import TokenizerError
from tinyformers.tokenizers.bpe import (
    Literals,
    StreamDecoder,
    _without_lone_surrogates,
    join_token_bytes,
)


class CharTokenizer:
    """Encode text to ids and back, one id per character; the interface of `Tokenizer`.

    Example:
        >>> tok = CharTokenizer.from_text("hello world")
        >>> tok.encode("hold!")  # '!' is not in the vocabulary
        [3, 5, 4, 1]
    """

    def __init__(self, chars: Iterable[str], *, source: str = "<memory>") -> None:
        """`chars[i]` is the character of id i."""
        self.source = source
        self.chars: list[str] = list(chars)
        if not self.chars:
            raise TokenizerError(f"{source}: a character tokenizer needs at least one character")
        for c in self.chars:
            if not (isinstance(c, str) and len(c) == 1):
                raise TokenizerError(f"{source}: token {c!r:.40} is not one character")
            if "\ud800" <= c <= "\udfff":  # UTF-8 cannot hold a lone surrogate
                raise TokenizerError(f"{source}: token {c!r} is a lone surrogate")
        self._ids = {c: i for i, c in enumerate(self.chars)}
        if len(self._ids) != len(self.chars):
            twice = next(c for i, c in enumerate(self.chars) if self._ids[c] != i)
            raise TokenizerError(f"{source}: character {twice!r} is listed twice")
        self._id_to_bytes = [c.encode("utf-8") for c in self.chars]
        self.vocab_size: int = len(self.chars)
        self.max_token_bytes = max(map(len, self._id_to_bytes))  # bounds the tokens of a text
        # The roles the other tokenizers fill; nanoGPT's character vocabulary has none of them.
        self.special_tokens: dict[str, int] = {}
        self.added_tokens: dict[str, int] = {}
        self.literals = Literals((), ())
        self.bos_token_id: int | None = None
        self.eos_token_id: int | None = None
        self.pad_token_id: int | None = None
        self.eos_token_ids: list[int] = []
        self.bos_token: str | None = None
        self.eos_token: str | None = None
        self.add_bos_token = False
        self.chat_template: str | None = None

    @classmethod
    def from_text(cls, text: str, *, source: str = "<text>") -> CharTokenizer:
        """The vocabulary of a training text: its distinct characters, sorted (nanoGPT's ids)."""
        return cls(sorted(set(_without_lone_surrogates(text))), source=source)

    def __repr__(self) -> str:
        return f"CharTokenizer({self.source!r}, vocab_size={self.vocab_size})"

    def __len__(self) -> int:
        return self.vocab_size

    def encode(
        self, text: str, *, allowed_special: Set[str] | Literal["all"] = frozenset()
    ) -> list[int]:
        """The id of each character of `text` that is in the vocabulary; the others are dropped.

        `allowed_special` is accepted for the common interface: there are no special tokens, so
        only "all" or an empty set is valid.
        """
        if allowed_special != "all" and allowed_special:
            raise ValueError(f"not special tokens of {self.source}: {sorted(allowed_special)}")
        ids = self._ids
        return [ids[c] for c in _without_lone_surrogates(text) if c in ids]

    def encode_batch(
        self, texts: Iterable[str], *, allowed_special: Set[str] | Literal["all"] = frozenset()
    ) -> list[list[int]]:
        return [self.encode(t, allowed_special=allowed_special) for t in texts]

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        """The UTF-8 bytes of `ids` (every token is a whole character)."""
        return join_token_bytes(self._id_to_bytes, ids, self.source)

    def decode(self, ids: Iterable[int]) -> str:
        """The text of `ids`: their characters, concatenated."""
        return self.decode_bytes(ids).decode("utf-8")

    def id_to_text(self, token_id: int) -> str:
        """One token as text: its character."""
        return self.decode([token_id])

    def decoder(self) -> StreamDecoder:
        """An incremental decoder for streaming generated ids (the same as the others')."""
        return StreamDecoder(self)
