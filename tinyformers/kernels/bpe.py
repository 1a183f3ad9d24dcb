"""The encoders of bpe.cpp (byte-level BPE, SentencePiece), built once per tokenizer from
its tables.

A tokenizer asks for one at its first encode and keeps its own Python loop as the reference
and the fallback (no compiler, TINYFORMERS_NO_KERNELS=1). bpe.cpp is built apart from the
kernels, with no vector flags, so a CPU without AVX-512 or AVX2 still runs it.
"""

from __future__ import annotations

import functools

import numpy as np
import regex
import torch

from tinyformers.tokenizers.bpe import GPT2_PATTERN, LLAMA3_PATTERN

from .build import load_tokenizer_ops

# The split patterns bpe.cpp writes out, by the number it knows each by (its `Pattern`).
PATTERNS = {GPT2_PATTERN: 0, LLAMA3_PATTERN: 1, r"\p{N}": 2, r"\p{N}+": 3, r"\p{N}{1,3}": 4}


@functools.cache
def unicode_classes() -> torch.Tensor:
    """One byte per code point: 1 for \\p{L}, 2 for \\p{N}, 4 for \\s, as the `regex` module
    reads them (so the C++ split agrees with the Python one by construction); ~20 ms."""
    # every code point in one string, made without a str object per character (a join of
    # 1.1M chr() briefly took ~90 MB, on the rank that tokenizes)
    codes = np.arange(0x110000, dtype="<u4").tobytes()
    every = codes.decode("utf-32-le", errors="surrogatepass")
    classes = np.zeros(0x110000, dtype=np.uint8)
    for bit, pattern in ((1, r"\p{L}+"), (2, r"\p{N}+"), (4, r"\s+")):
        for m in regex.finditer(pattern, every):
            classes[m.start() : m.end()] |= bit
    return torch.from_numpy(classes)


class NativeEncoder:
    """A tokenizer's merge table (and split, for byte-level BPE) in C++; `encode` and `merge`
    return its ids."""

    def __init__(self, encoder: object, splits: bool) -> None:
        self._encoder = encoder
        self.splits = splits  # True when every split pattern is one bpe.cpp writes out

    def encode(self, text: str) -> list[int]:
        """The ids of `text`, split here (only when `splits`)."""
        if not text:
            return []
        return self._encoder.encode(_bytes(text.encode("utf-8"))).tolist()

    def merge(self, pieces: list[str], fixed: list[int] | None = None) -> list[int]:
        """The ids of pieces split by the caller, in one call for all of them; SentencePiece
        takes `fixed`, the id of each piece that is a literal token (an empty piece), else -1."""
        data = _bytes("".join(pieces).encode("utf-8"))
        lengths = torch.tensor([len(p) for p in pieces], dtype=torch.int64)
        if fixed is None:
            return self._encoder.merge(data, lengths).tolist()
        return self._encoder.merge(data, lengths, torch.tensor(fixed, dtype=torch.int64)).tolist()


def byte_level_encoder(
    merges: dict[tuple[int, int], tuple[int, int]],
    byte_ids: list[int | None],
    split_patterns: list[str],
    whole_pieces: dict[bytes, int] | None,
) -> NativeEncoder | None:
    """The C++ encoder of a byte-level BPE tokenizer (`tokenizers.bpe.Tokenizer`'s tables),
    or None where bpe.cpp cannot build."""
    if load_tokenizer_ops()[0] is None:
        return None
    rows = [(x, y, rank, merged) for (x, y), (rank, merged) in merges.items()]
    table = torch.tensor(rows, dtype=torch.int64).reshape(-1, 4)
    ids = torch.tensor([-1 if i is None else i for i in byte_ids], dtype=torch.int64)
    splits = all(p in PATTERNS for p in split_patterns)
    codes = torch.tensor([PATTERNS[p] for p in split_patterns] if splits else [], dtype=torch.int64)
    whole = list((whole_pieces or {}).items())
    blob = b"".join(token for token, _ in whole)
    offsets = np.cumsum([0] + [len(token) for token, _ in whole], dtype=np.int64)
    encoder = torch.classes.tinyformers.BytePairEncoder(
        table,
        ids,
        unicode_classes(),
        codes,
        _bytes(blob),
        torch.from_numpy(offsets),
        torch.tensor([i for _, i in whole], dtype=torch.int64),
    )
    return NativeEncoder(encoder, splits)


def sentencepiece_encoder(
    tokens: list[str],
    priority: dict[str, float] | None,
    pair_ranks: dict[tuple[str, str], int] | None,
    byte_ids: list[int | None],
) -> NativeEncoder | None:
    """The C++ merge loop of a `SentencePieceTokenizer`: merges by `priority` (token text ->
    heap key) or by `pair_ranks` ((left, right) -> rank), or None where bpe.cpp cannot build."""
    if load_tokenizer_ops()[0] is None:
        return None
    data = [t.encode("utf-8", errors="surrogatepass") for t in tokens]
    offsets = np.cumsum([0] + [len(d) for d in data], dtype=np.int64)
    ids = {t: i for i, t in enumerate(tokens)}
    rows = [(ids[a], ids[b], rank, ids[a + b]) for (a, b), rank in (pair_ranks or {}).items()]
    encoder = torch.classes.tinyformers.SentencePieceEncoder(
        _bytes(b"".join(data)),
        torch.from_numpy(offsets),
        torch.tensor([priority[t] for t in tokens] if priority else [], dtype=torch.float64),
        torch.tensor(rows, dtype=torch.int64).reshape(-1, 4),
        torch.tensor([-1 if i is None else i for i in byte_ids], dtype=torch.int64),
    )
    return NativeEncoder(encoder, splits=False)


def _bytes(data: bytes) -> torch.Tensor:
    if not data:  # frombuffer refuses an empty buffer
        return torch.empty(0, dtype=torch.uint8)
    return torch.frombuffer(bytearray(data), dtype=torch.uint8)
