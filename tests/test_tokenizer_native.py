"""The C++ encoders (kernels/bpe.cpp) give exactly the ids of the Python loops they replace
(tokenizers/bpe.py and sentencepiece.py, `native = False`), on the corpus and on the pieces
that take their other paths: long pieces (rounds, then buckets), Llama 3's split and
whole-token rule, a split pattern it does not know (split in Python, merged in C++), and
SentencePiece by scores (GGUF) and by merges (tokenizer.json), literal tokens between."""

from __future__ import annotations

import random
from functools import lru_cache

import pytest
from conftest import gemma3_gguf
from corpus import GPT2_DIR, build_corpus, smollm2_gguf
from test_tokenizer_spm import hf_tokenizer_folder

from tinyformers.kernels.build import load_tokenizer_ops
from tinyformers.tokenizers import Tokenizer, load_tokenizer
from tinyformers.tokenizers.bpe import LLAMA3_PATTERN


@lru_cache(maxsize=1)
def texts() -> tuple[str, ...]:
    """1 MB of the corpus, then pieces of 5k to 300k tokens and Llama 3's contraction cases."""
    rng = random.Random(0)
    letters = "".join(rng.choices("abcdefghijklmnopqrstuvwxyz", k=300_000))
    return (
        *build_corpus(1_000_000),
        letters,  # rounds stop at once (no pair is common), then buckets
        "".join(rng.choices("0123456789", k=100_000)),
        "a" * 100_001,  # rounds all the way
        "ab" * 3_000,  # a piece just over 4096 bytes
        " " * 70_000 + "x",
        "".join(rng.choices("!?.,;", k=20_000)),
        "".join(chr(rng.randrange(0x4E00, 0xA000)) for _ in range(20_000)),
        "I'M HE'LL 'Ve 'ſ x'S\r\n\r\n  \n\tword (word 1234567 ",
        "<start_of_turn>user\n<0x41>\x00 ▁▁ hi<end_of_turn>\n\n\t",  # Gemma's literals
    )


def gpt2_with(split_patterns: list[str], ignore_merges: bool = False) -> Tokenizer:
    base = load_tokenizer(GPT2_DIR)
    return Tokenizer(base.vocab, base.merges, split_patterns, ignore_merges=ignore_merges)


TOKENIZERS = {
    "gpt2": lambda: load_tokenizer(GPT2_DIR),
    "smollm2": lambda: load_tokenizer(smollm2_gguf()),  # \p{N} first; bytes with no token
    "llama3_split": lambda: gpt2_with([LLAMA3_PATTERN], ignore_merges=True),
    "unknown_split": lambda: gpt2_with([r"\S+|\s+"]),
    "gemma3_scores": lambda: load_tokenizer(gemma3_gguf()),
    # transformers' conversion of the same GGUF, saved by tests/test_tokenizer_spm.py
    "gemma3_merges": lambda: load_tokenizer(gemma3_hf_json()),
}


def gemma3_hf_json():
    return hf_tokenizer_folder() / "tokenizer.json"  # made once, shared with its own tests


@pytest.mark.skipif(load_tokenizer_ops()[0] is None, reason="bpe.cpp cannot build here")
@pytest.mark.parametrize("name", TOKENIZERS)
def test_native_ids_equal_the_python_loop(name):
    native, python = TOKENIZERS[name](), TOKENIZERS[name]()
    python.native = False
    assert native._native() is not None  # the C++ path really runs
    assert native._native().splits == (name in ("gpt2", "smollm2", "llama3_split"))
    for k, text in enumerate(texts()):
        ours, reference = native.encode(text), python.encode(text)
        assert ours == reference, f"text {k} ({text[:30]!r}): {len(ours)} vs {len(reference)} ids"


def test_native_is_off_without_kernels(monkeypatch):
    """TINYFORMERS_NO_KERNELS=1 (or no compiler) leaves the Python loop, with the same ids."""
    monkeypatch.setattr("tinyformers.kernels.bpe.load_tokenizer_ops", lambda: (None, "disabled"))
    tok = load_tokenizer(GPT2_DIR)
    assert tok.encode("hello world") == [31373, 995] and tok._native() is None
