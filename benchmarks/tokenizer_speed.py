"""Encode speed: tinyformers' BPE vs tiktoken and HF tokenizers (Rust), one run.

The corpus is the tests' >= 5 MB mix (tests/corpus.py). Each tokenizer encodes it document by
document on one thread; we are timed cold (a fresh tokenizer, empty word cache) and warm (the
same tokenizer again). Lone surrogates are fixed up first, the way tiktoken does, because HF
refuses them. Then one 1,000,000-character piece without spaces (the quadratic-merge trap),
and 10 MB of each character class (ours only: one piece that long takes tiktoken minutes).
Ratios are ours / reference speed, so 0.25 means four times slower. Ours runs its C++ loop
(kernels/bpe.cpp); TINYFORMERS_NO_KERNELS=1 times the Python one.

Usage: python benchmarks/tokenizer_speed.py [--reps 3] [--mb 5]
"""

import sys
from pathlib import Path

# subtle: run as a script, this folder is sys.path[0] and this file would shadow the standard
# library's `tokenize` (which linecache imports lazily): put the tests folder there instead.
sys.path[0] = str(Path(__file__).resolve().parents[1] / "tests")

import argparse  # noqa: E402
import functools  # noqa: E402
import os  # noqa: E402
import random  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

os.environ.setdefault("RAYON_NUM_THREADS", "1")  # HF tokenizers: one thread, like the others
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from corpus import (  # noqa: E402
    GPT2_DIR,
    build_corpus,
    hf_gpt2,
    hf_smollm_from_gguf,
    smollm2_gguf,
    tiktoken_gpt2,
    utf8_safe,
)

from tinyformers.tokenizers import load_tokenizer  # noqa: E402


def seconds(fn, reps: int) -> float:
    """Median wall time of `fn()` over `reps` runs."""
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def report(title: str, size_mb: float, rows: list[tuple[str, float]]) -> None:
    print(f"\n{title} ({size_mb:.2f} MB)")
    ours = rows[0][1]
    for name, t in rows:
        ratio = "" if t is ours else f"   ours/this speed {t / ours:.2f}"
        print(f"  {name:<28} {size_mb / t:7.2f} MB/s  {t:7.2f} s{ratio}")


def corpus_benchmarks(docs: list[str], reps: int) -> None:
    size_mb = sum(len(d.encode("utf-8")) for d in docs) / 1e6
    gpt2 = load_tokenizer(GPT2_DIR)  # cold: timed once, before any warm run
    gpt2.encode("")  # builds the C++ encoder (and loads the kernels), caching no piece
    cold = seconds(lambda: gpt2.encode_batch(docs), 1)
    rows = [
        ("tinyformers (warm cache)", seconds(lambda: gpt2.encode_batch(docs), reps)),
        ("tinyformers (cold cache)", cold),
        (
            "tiktoken",
            seconds(lambda: tiktoken_gpt2().encode_ordinary_batch(docs, num_threads=1), reps),
        ),
        ("HF tokenizers", seconds(lambda: hf_gpt2().encode_batch(docs), reps)),
    ]
    report("GPT-2 vocab.json + merges.txt, corpus", size_mb, rows)

    smollm = load_tokenizer(smollm2_gguf())
    smollm.encode("")
    cold = seconds(lambda: smollm.encode_batch(docs), 1)
    hf = hf_smollm_from_gguf().backend_tokenizer
    rows = [
        ("tinyformers (warm cache)", seconds(lambda: smollm.encode_batch(docs), reps)),
        ("tinyformers (cold cache)", cold),
        ("HF tokenizers (from GGUF)", seconds(lambda: hf.encode_batch(docs), reps)),
    ]
    report("SmolLM2 GGUF, corpus", size_mb, rows)


def pathological(reps: int) -> None:
    text = "".join(random.Random(0).choices("abcdefghijklmnopqrstuvwxyz", k=1_000_000))
    gpt2 = load_tokenizer(GPT2_DIR)  # pieces this long skip the word cache
    rows = [
        ("tinyformers", seconds(lambda: gpt2.encode(text), reps)),
        ("tiktoken", seconds(lambda: tiktoken_gpt2().encode_ordinary(text), reps)),
        ("HF tokenizers", seconds(lambda: hf_gpt2().encode(text), reps)),
    ]
    report("GPT-2, one 1,000,000-letter piece", 1.0, rows)


def character_classes() -> None:
    """10 MB of one character class each, random within the class, on GPT-2 and SmolLM2."""
    rng = random.Random(0)
    texts = {
        "digits": "".join(rng.choices("0123456789", k=10**7)),
        "letters": "".join(rng.choices("abcdefghijklmnopqrstuvwxyz", k=10**7)),
        "spaces": " " * 10**7,
        "punctuation": "".join(rng.choices('!"#$%&()*+,-./:;<=>?@[]^_`{|}~', k=10**7)),
        "CJK": "".join(chr(rng.randrange(0x4E00, 0xA000)) for _ in range(10**7 // 3)),
        "emoji": "".join(chr(rng.randrange(0x1F600, 0x1F650)) for _ in range(10**7 // 4)),
    }
    print("\n10 MB of one character class, seconds of wall / CPU time (ours)")
    for name, source in (("GPT-2", GPT2_DIR), ("SmolLM2", smollm2_gguf())):
        tok = load_tokenizer(source)
        tok.encode("")  # builds the C++ encoder
        times = []
        for what, text in texts.items():
            cpu = time.process_time()  # on a shared machine the CPU time says more
            wall = seconds(functools.partial(tok.encode, text), 1)
            times.append(f"{what} {wall:.2f}/{time.process_time() - cpu:.2f}")
        print(f"  {name:<8}" + "  ".join(times))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--mb", type=float, default=5.0, help="corpus size")
    args = parser.parse_args()
    docs = [utf8_safe(d) for d in build_corpus(int(args.mb * 1_000_000))]
    corpus_benchmarks(docs, args.reps)
    pathological(args.reps)
    character_classes()
    print(f"\nload average {os.getloadavg()[0]:.2f} at the end")


if __name__ == "__main__":
    main()
