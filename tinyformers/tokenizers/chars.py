"""Character-level tokenizer: each distinct character of the training text is one token.

nanoGPT's `shakespeare_char` (data/shakespeare_char/prepare.py): `chars = sorted(set(text))`,
id i is chars[i], so a model trained here reads the same ids as one trained there. No merges,
no special tokens; a character outside the vocabulary is dropped on encode, as HF `tokenizers`
does for a BPE model without an unknown token (which is how `save_tokenizer` writes this one).
"""

from __future__ import annotations

from collections.abc import Iterable

from tinyformers.errors import TokenizerError
from tinyformers.tokenizers.bpe import TokenizerBase, _without_lone_surrogates


class CharTokenizer(TokenizerBase):
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
        self._take_roles({}, {})  # nanoGPT's character vocabulary names no special tokens

    @classmethod
    def from_text(cls, text: str, *, source: str = "<text>") -> CharTokenizer:
        """The vocabulary of a training text: its distinct characters, sorted (nanoGPT's ids)."""
        return cls(sorted(set(_without_lone_surrogates(text))), source=source)

    def _encode_text(self, text: str, deadline: float) -> list[int]:
        """The id of each character in the vocabulary; the others are dropped. No split
        pattern runs, so no `deadline` applies."""
        ids = self._ids
        return [ids[c] for c in text if c in ids]
