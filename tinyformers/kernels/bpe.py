"""The byte-level BPE encoder of bpe.cpp, built once per tokenizer from its tables.

`tokenizers/bpe.py` asks for it at the first encode and keeps its own Python loop as the
reference and the fallback (no compiler, a CPU without AVX-512, TINYFORMERS_NO_KERNELS=1).
"""

from __future__ import annotations

import functools

import numpy as np
import regex
import torch

from tinyformers.tokenizers.bpe import GPT2_PATTERN, LLAMA3_PATTERN

from .build import load_ops

# The split patterns bpe.cpp writes out, by the number it knows each by (its `Pattern`).
PATTERNS = {GPT2_PATTERN: 0, LLAMA3_PATTERN: 1, r"\p{N}": 2, r"\p{N}+": 3, r"\p{N}{1,3}": 4}


@functools.cache
def unicode_classes() -> torch.Tensor:
    """One byte per code point: 1 for \\p{L}, 2 for \\p{N}, 4 for \\s, as the `regex` module
    reads them (so the C++ split agrees with the Python one by construction); ~20 ms."""
    every = "".join(map(chr, range(0x110000)))
    classes = np.zeros(0x110000, dtype=np.uint8)
    for bit, pattern in ((1, r"\p{L}+"), (2, r"\p{N}+"), (4, r"\s+")):
        for m in regex.finditer(pattern, every):
            classes[m.start() : m.end()] |= bit
    return torch.from_numpy(classes)


class NativeEncoder:
    """A tokenizer's merge table and split in C++; `encode` and `merge` return its ids."""

    def __init__(self, encoder: object, splits: bool) -> None:
        self._encoder = encoder
        self.splits = splits  # True when every split pattern is one bpe.cpp writes out

    def encode(self, text: str) -> list[int]:
        """The ids of `text`, split here (only when `splits`)."""
        if not text:
            return []
        return self._encoder.encode(_bytes(text.encode("utf-8"))).tolist()

    def merge(self, pieces: list[str]) -> list[int]:
        """The ids of pieces split by the caller, in one call for all of them."""
        data = "".join(pieces).encode("utf-8")
        if not data:
            return []
        lengths = torch.tensor([len(p) for p in pieces], dtype=torch.int64)
        return self._encoder.merge(_bytes(data), lengths).tolist()


def native_encoder(
    merges: dict[tuple[int, int], tuple[int, int]],
    byte_ids: list[int | None],
    split_patterns: list[str],
    whole_pieces: dict[bytes, int] | None,
) -> NativeEncoder | None:
    """The C++ encoder of a byte-level BPE tokenizer (tokenizers/bpe.py's tables), or None
    where the kernels cannot build."""
    if load_ops()[0] is None:
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
        _bytes(blob) if blob else torch.empty(0, dtype=torch.uint8),
        torch.from_numpy(offsets),
        torch.tensor([i for _, i in whole], dtype=torch.int64),
    )
    return NativeEncoder(encoder, splits)


def _bytes(data: bytes) -> torch.Tensor:
    return torch.frombuffer(bytearray(data), dtype=torch.uint8)
