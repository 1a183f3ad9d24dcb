"""SentencePiece-style BPE (Llama 2, Gemma): text -> ▁ for spaces -> merges by priority -> ids,
with `<0xNN>` byte tokens for what no token covers.

How it differs from byte-level BPE (bpe.py):
- tokens are text, not bytes: a space is written ▁ (U+2581) and merges join characters;
- no split pattern: llama.cpp (`llm_tokenizer_spm`) merges across a whole text fragment;
- priority comes from the merged token's score (GGUF `tokenizer.ggml.scores`: highest first,
  leftmost first on ties), or from a `tokenizer.json`'s merge list (lowest rank first);
- a character no token covers becomes one `<0xNN>` token per UTF-8 byte (byte fallback), or
  the unknown token where the vocabulary has no such byte token.
"""

from __future__ import annotations

import heapq
import math
import re
from collections.abc import Iterable
from typing import TYPE_CHECKING, Unpack

from tinyformers.errors import TokenizerError
from tinyformers.tokenizers.bpe import MAX_VOCAB, Roles, TokenizerBase, encode_cached

if TYPE_CHECKING:
    from tinyformers.kernels.bpe import NativeEncoder

SPACE = "\u2581"  # ▁, SentencePiece's visible space
_BYTE_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>")


class SentencePieceTokenizer(TokenizerBase):
    """Encode text to ids and back; the same interface as the byte-level `Tokenizer`.

    Example:
        >>> tok = load_tokenizer("gemma-3-270m-q4_k_m.gguf")
        >>> tok.encode("The capital of France is")
        [818, 5279, 529, 7001, 563]
    """

    def __init__(
        self,
        tokens: list[str],
        *,
        scores: list[float] | None = None,
        merges: list[tuple[str, str]] | None = None,
        add_space_prefix: bool = False,
        source: str = "<memory>",
        **roles: Unpack[Roles],
    ) -> None:
        """`tokens[i]` is the text of id i. Exactly one of `scores` (one per token, GGUF) and
        `merges` (pairs in rank order, tokenizer.json) sets the merge priority."""
        self.source = source
        if not isinstance(tokens, list) or not 0 < len(tokens) <= MAX_VOCAB:
            raise TokenizerError(f"{source}: expected a vocabulary of 1 to {MAX_VOCAB} tokens")
        if not all(isinstance(t, str) and t for t in tokens):
            bad = next(t for t in tokens if not (isinstance(t, str) and t))
            raise TokenizerError(f"{source}: token {bad!r:.40} is empty or not a string")
        self._ids = {t: i for i, t in enumerate(tokens)}
        if len(self._ids) != len(tokens):
            twice = next(t for i, t in enumerate(tokens) if self._ids[t] != i)
            raise TokenizerError(f"{source}: token {twice!r:.40} is listed twice")
        self.vocab_size: int = len(tokens)
        if (scores is None) == (merges is None):
            raise TokenizerError(f"{source}: expected either scores or merges, not both or none")
        # What it is built from, kept as given so `save_tokenizer` can write it out again.
        self.tokens = tokens
        self.scores = scores
        self.merges = merges
        # subtle: the priority of merging symbols a and b. With scores (llama.cpp) any a + b that
        # is a token may merge, control tokens included; with merges (HF) only listed pairs.
        self._priority = _score_priority(tokens, scores, source) if merges is None else None
        self._pair_ranks = None if merges is None else _pair_ranks(self._ids, merges, source)
        self._take_roles(self._ids, roles)
        self._id_to_bytes = [_token_bytes(t) for t in tokens]
        self.max_token_bytes = max(map(len, self._id_to_bytes))  # bounds the tokens of a text
        self._byte_ids = [_byte_id(self._ids, b, self.unk_token_id) for b in range(256)]
        self._chunks = _chunk_splitter(tokens)
        self._cache: dict[str, list[int]] = {}
        if not isinstance(add_space_prefix, bool):
            raise TokenizerError(
                f"{source}: add_space_prefix {add_space_prefix!r:.40} is not a boolean"
            )
        self.add_space_prefix = add_space_prefix
        self.bos_token = None if self.bos_token_id is None else tokens[self.bos_token_id]
        self.eos_token = None if self.eos_token_id is None else tokens[self.eos_token_id]
        self.pad_token = None if self.pad_token_id is None else tokens[self.pad_token_id]
        self.unk_token = None if self.unk_token_id is None else tokens[self.unk_token_id]

    # -- encoding --------------------------------------------------------------------------

    def _encode_text(self, text: str, deadline: float = math.inf) -> list[int]:
        """Text between literal tokens: every such fragment gets the space prefix when the
        source asks for one (llama.cpp: at the start and after each special token). No split
        pattern runs, so no `deadline` applies."""
        if not text:
            return []
        return encode_cached(self._cache, self._chunks(self._escaped(text)), self._encode_chunk)

    def _encode_parts(self, parts: list[str | int], deadline: float) -> list[int]:
        """`TokenizerBase._encode_parts` in one C++ call where the kernels build.

        subtle: Gemma's added tokens include "\n", "\t" and runs of spaces, so one text holds
        thousands of parts: a call per part cost more than its merges. A literal token goes
        over as an empty chunk with its id fixed.
        """
        native = self._native() if self.native else None
        if native is None:
            return super()._encode_parts(parts, deadline)
        chunks: list[str] = []
        fixed: list[int] = []
        for part in parts:
            if isinstance(part, int):
                chunks.append("")
                fixed.append(part)
            elif part:
                found = self._chunks(self._escaped(part))
                chunks += found
                fixed += [-1] * len(found)
        return native.merge(chunks, fixed)

    def _escaped(self, text: str) -> str:
        """Text as the vocabulary spells it: the space prefix where the source asks, ▁ for
        spaces."""
        return (" " + text if self.add_space_prefix else text).replace(" ", SPACE)

    def _build_native(self) -> NativeEncoder | None:
        # subtle: imported here, as in bpe.py: nothing compiles until a tokenizer encodes
        from tinyformers.kernels.bpe import sentencepiece_encoder

        return sentencepiece_encoder(self.tokens, self._priority, self._pair_ranks, self._byte_ids)

    def _encode_chunk(self, chunk: str) -> list[int]:
        ids: list[int] = []
        for symbol in self._merge(chunk):
            token_id = self._ids.get(symbol)
            if token_id is not None:
                ids.append(token_id)
            else:  # a character no token covers: its UTF-8 bytes as <0xNN> tokens
                ids += [i for b in symbol.encode("utf-8") if (i := self._byte_ids[b]) is not None]
        return ids

    def _merge(self, chunk: str) -> list[str]:
        """The symbols of `chunk` after merging, best priority first, leftmost first on ties.

        llama.cpp's loop: a heap of (priority, left position, merged length) over a linked
        list of live symbols. An entry is stale once either side changed, which its merged
        length no longer matching shows; each merge pushes at most the two new neighbours.
        """
        symbols = list(chunk)
        n = len(symbols)
        # subtle: the lookup is inlined (a method call per pair cost a third of the time)
        by_text = self._pair_ranks is None
        priority = (self._priority if by_text else self._pair_ranks).get
        heap = []
        for i in range(n - 1):
            a, b = symbols[i], symbols[i + 1]
            if (p := priority(a + b if by_text else (a, b))) is not None:
                heap.append((p, i, 2))
        if not heap:
            return symbols
        heapq.heapify(heap)
        nxt = list(range(1, n + 1))
        prv = list(range(-1, n - 1))
        while heap:
            _, i, size = heapq.heappop(heap)
            j = nxt[i]
            if not symbols[i] or j >= n or len(symbols[i]) + len(symbols[j]) != size:
                continue  # stale: a side merged since this pair was pushed
            a = symbols[i] = symbols[i] + symbols[j]
            symbols[j] = ""
            nxt[i] = nxt[j]
            if nxt[i] < n:
                prv[nxt[i]] = i
                b = symbols[nxt[i]]
                if (p := priority(a + b if by_text else (a, b))) is not None:
                    heapq.heappush(heap, (p, i, size + len(b)))
            if (h := prv[i]) >= 0:
                b = symbols[h]
                if (p := priority(b + a if by_text else (b, a))) is not None:
                    heapq.heappush(heap, (p, h, len(b) + size))
        return [s for s in symbols if s]

    # -- decoding --------------------------------------------------------------------------

    def decode(self, ids: Iterable[int]) -> str:
        """The text of `ids`; bytes that are not valid UTF-8 become U+FFFD.

        With `add_space_prefix`, the space the encoder put before the text is dropped (as
        llama.cpp and HF's Strip decoder do), so decode(encode(text)) == text.
        """
        data = self.decode_bytes(ids)
        if self.add_space_prefix and data.startswith(b" "):
            data = data[1:]
        return data.decode("utf-8", errors="replace")


def _score_priority(tokens: list[str], scores: list[float], source: str) -> dict[str, float]:
    """Token text -> minus its score, the heap key of a merge that makes that token."""
    if not isinstance(scores, list) or len(scores) != len(tokens):
        got = len(scores) if isinstance(scores, list) else type(scores).__name__
        raise TokenizerError(f"{source}: expected {len(tokens)} scores, got {got}")
    if not all(isinstance(s, int | float) and not isinstance(s, bool) for s in scores):
        raise TokenizerError(f"{source}: a token score is not a number")
    if not all(map(math.isfinite, scores)):
        raise TokenizerError(f"{source}: a token score is not finite")
    return {t: -float(s) for t, s in zip(tokens, scores, strict=True)}


def _pair_ranks(
    ids: dict[str, int], merges: list[tuple[str, str]], source: str
) -> dict[tuple[str, str], int]:
    """(left, right) -> rank; both sides and the merged token must be in the vocabulary."""
    ranks: dict[tuple[str, str], int] = {}
    for rank, (left, right) in enumerate(merges):
        for token in (left, right, left + right):
            if token not in ids:
                raise TokenizerError(
                    f"{source}: merge {rank} '{left} {right}' names {token!r:.40}, not in the vocab"
                )
        ranks.setdefault((left, right), rank)  # a repeated pair keeps its first rank
    return ranks


def _token_bytes(token: str) -> bytes:
    """What a token decodes to: `<0xNN>` is that byte; ▁ is a space."""
    if len(token) == 6 and (m := _BYTE_TOKEN.fullmatch(token)):
        return bytes([int(m.group(1), 16)])
    return token.replace(SPACE, " ").encode("utf-8", errors="surrogatepass")


def _byte_id(ids: dict[str, int], byte: int, unk_token_id: int | None) -> int | None:
    """The token for one byte of an uncovered character: `<0xNN>`, else the byte as a
    one-character token (llama.cpp's fallback for ASCII), else the unknown token."""
    token_id = ids.get(f"<0x{byte:02X}>")
    if token_id is None and byte < 0x80:
        token_id = ids.get(chr(byte))
    return unk_token_id if token_id is None else token_id


def _chunk_splitter(tokens: list[str]):
    """Split ▁-escaped text before each ▁ that follows another character, where no token can
    span the cut, so chunks merge independently and repeat (the cache's unit, like words).

    subtle: a cut between c and ▁ is exact only if no token contains c▁ (a merge only ever
    makes a token); Gemma has one such token, '>▁</', so '>' keeps its ▁.
    """
    glue = {t[i - 1] for t in tokens if SPACE in t[1:] for i in _space_positions(t) if i > 0}
    glue.discard(SPACE)
    keep = re.escape(SPACE + "".join(sorted(glue)))
    return re.compile(f"(?<=[^{keep}])(?={SPACE})").split


def _space_positions(token: str) -> list[int]:
    return [i for i, c in enumerate(token) if c == SPACE]
