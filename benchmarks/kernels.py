"""Decode matmul speed: tinyformers.kernels vs torch's stock ops on real model shapes.

One pass multiplies M rows of activations by every weight matrix of one decode step (distinct
matrices, far more bytes than the L3 cache holds), as a real decode step does. Variants run
interleaved, pass by pass, so other load on the machine hits them alike; medians are printed:
GB/s of weight bytes read, ms per step, ours / the best torch variant of the same format, and
the plain-read bandwidth (`tensor.sum()` over 340 MB) of the same run.

Usage: python benchmarks/kernels.py [--threads 2] [--rows 1,8] [--reps 11] [--models gpt2,smollm2]
"""

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from tinyformers import kernels

GPT2_BLOCK = [(2304, 768), (768, 768), (3072, 768), (768, 3072)]  # (out, in): qkv, proj, fc, fc
SMOL_BLOCK = [(576, 576), (192, 576), (192, 576), (576, 576), (1536, 576), (1536, 576), (576, 1536)]
MODELS = {  # every matrix one decode step reads: the blocks, then the lm_head
    "gpt2": GPT2_BLOCK * 12 + [(50257, 768)],
    "smollm2": SMOL_BLOCK * 30 + [(49152, 576)],
}


def nbytes(*tensors: torch.Tensor | None) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def variants(fmt: str, ws: list[torch.Tensor]):
    """(name, step function, weight bytes) for ours and torch's stock ops in one format."""
    if fmt == "f32":
        ours = [kernels.pack(w, "f32") for w in ws]
        wts = [
            w.t().contiguous() for w in ws
        ]  # [K, N]: x @ W^T with the transposed side contiguous
        yield "ours f32", lambda x: [kernels.linear(x[w.k], w) for w in ours], nbytes(*ws)
        yield "torch F.linear", lambda x: [F.linear(x[w.shape[1]], w) for w in ws], nbytes(*ws)
        yield "torch x @ W^T", lambda x: [x[w.shape[0]] @ w for w in wts], nbytes(*ws)
    elif fmt == "bf16":
        ours = [kernels.pack(w, "bf16") for w in ws]
        wb = [w.bfloat16() for w in ws]
        yield "ours bf16", lambda x: [kernels.linear(x[w.k], w) for w in ours], nbytes(*wb)
        yield (
            "torch F.linear",
            lambda x: [F.linear(x[w.shape[1]].bfloat16(), w) for w in wb],
            nbytes(*wb),
        )
    elif fmt == "fp16":  # no kernel of ours: torch's fastest stock path, for scale
        wh = [w.half() for w in ws]
        yield (
            "torch F.linear",
            lambda x: [F.linear(x[w.shape[1]].half(), w) for w in wh],
            nbytes(*wh),
        )
    elif fmt == "q4":
        ours = [kernels.pack(w, "q4") for w in ws]
        yield (
            "ours q4",
            lambda x: [kernels.linear(x[w.k], w) for w in ours],
            sum(nbytes(w.data, w.scales) for w in ours),
        )
        # torch's weight-only int4 (groups of 32, bf16 scales and zeros, bf16 activations)
        q = [
            (
                torch.ops.aten._convert_weight_to_int4pack_for_cpu(  # N padded to 16: its rule
                    torch.randint(
                        0, 16, (-(-w.shape[0] // 16) * 16, w.shape[1]), dtype=torch.int32
                    ),
                    1,
                ),
                torch.randn(w.shape[1] // 32, -(-w.shape[0] // 16) * 16, 2).bfloat16(),
            )
            for w in ws
        ]
        step = lambda x: [  # noqa: E731
            torch.ops.aten._weight_int4pack_mm_for_cpu(x[s.shape[0] * 32].bfloat16(), w, 32, s)
            for w, s in q
        ]
        yield "torch int4pack_mm", step, sum(nbytes(w, s) for w, s in q)
    else:
        for name, group in (("G=32", 32), ("G=K", 0)):
            ours = [kernels.pack(w, "int8", group_size=group or w.shape[1]) for w in ws]
            yield (
                f"ours int8 {name}",
                lambda x, ours=ours: [kernels.linear(x[w.k], w) for w in ours],
                sum(nbytes(w.data, w.scales) for w in ours),
            )
        # torch's weight-only int8 (per-channel bf16 scales, bf16 activations)
        q = [(w.sign().to(torch.int8), w.abs().amax(1).bfloat16()) for w in ws]
        step = lambda x: [  # noqa: E731
            torch.ops.aten._weight_int8pack_mm(x[w.shape[1]].bfloat16(), w, s) for w, s in q
        ]
        yield "torch int8pack_mm", step, sum(nbytes(w, s) for w, s in q)


def measure(steps: list, x: dict, reps: int) -> list[tuple[float, float]]:
    """(median, fastest) seconds per pass of each step, passes interleaved across steps."""
    times = [[] for _ in steps]
    for step in steps:
        step(x)  # warm-up
    for _ in range(reps):
        for t, step in zip(times, steps, strict=True):
            start = time.perf_counter()
            step(x)
            t.append(time.perf_counter() - start)
    return [(statistics.median(t), min(t)) for t in times]


def report(model: str, fmt: str, m: int, vs: list, read_gbps: float, secs: list) -> None:
    print(f"\n{model} {fmt} M={m}  plain read {read_gbps:5.1f} GB/s  (median; fastest pass)")
    gbps = {name: nb / med / 1e9 for (name, _, nb), (med, _) in zip(vs, secs, strict=True)}
    best_torch = max(r for name, r in gbps.items() if name.startswith("torch"))
    for (name, _, nb), (med, fast) in zip(vs, secs, strict=True):
        ratio = f"x{gbps[name] / best_torch:4.2f} vs best torch" if name.startswith("ours") else ""
        print(
            f"  {name:18s} {gbps[name]:5.1f} GB/s {med * 1e3:7.2f} ms/step;"
            f" {nb / fast / 1e9:5.1f} GB/s  {ratio}"
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rows", default="1,8", help="rows of x per step (decode batch)")
    ap.add_argument("--reps", type=int, default=11)
    ap.add_argument("--models", default="gpt2,smollm2")
    ap.add_argument("--formats", default="f32,bf16,int8,q4,fp16")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"threads={args.threads}  kernels: {kernels.unavailable_reason() or 'compiled'}")
    big = torch.randn(85_000_000)
    gen = torch.Generator().manual_seed(0)
    for model in args.models.split(","):
        ws = [torch.randn(n, k, generator=gen) * 0.02 for n, k in MODELS[model]]
        for fmt in args.formats.split(","):
            vs = list(variants(fmt, ws))
            for m in map(int, args.rows.split(",")):
                x = {k: torch.randn(m, k, generator=gen) for k in {w.shape[1] for w in ws}}
                steps = [lambda x: big.sum()] + [step for _, step, _ in vs]
                secs = measure(steps, x, args.reps)
                report(model, fmt, m, vs, big.numel() * 4 / secs[0][0] / 1e9, secs[1:])
            del vs


if __name__ == "__main__":
    main()
