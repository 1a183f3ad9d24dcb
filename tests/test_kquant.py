"""kquant.cpp against its reference: GGUF's Q5_0, Q5_1, Q4_K, Q5_K and Q6_K blocks computed on as
stored give x @ dequantized(blocks).T within what quantizing x to int8 can move it, and the real
Gemma 3 270M Q4_K_M runs every matrix on its own blocks with the float32 model's greedy tokens."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import gemma3_gguf

import tinyformers
from tinyformers import kernels
from tinyformers.kernels.modules import PackedLinear
from tinyformers.loading.ggml_quants import BLOCK_LAYOUT, GGMLType, dequantize, kquant_split

pytestmark = pytest.mark.skipif(not kernels.available(), reason="needs the CPU kernels")

TYPES = (GGMLType.Q5_0, GGMLType.Q5_1, GGMLType.Q4_K, GGMLType.Q5_K, GGMLType.Q6_K)
# where each type keeps its fp16 scales (d, and dmin or m) in a block; every other byte is random
FP16_AT = {
    GGMLType.Q5_0: (0,),
    GGMLType.Q5_1: (0, 2),
    GGMLType.Q4_K: (0, 2),
    GGMLType.Q5_K: (0, 2),
    GGMLType.Q6_K: (208,),
}


def random_blocks(ggml_type: GGMLType, n: int, k: int, seed: int = 0) -> torch.Tensor:
    """Random but valid blocks of an [n, k] matrix: random bytes, with the fp16 scales set to
    finite values of a trained model's size (1e-3 to 1e-2)."""
    block_size, type_size = BLOCK_LAYOUT[ggml_type]
    rng = np.random.default_rng(seed)
    raw = rng.integers(0, 256, (n * k // block_size, type_size), dtype=np.uint8)
    for at in FP16_AT[ggml_type]:
        d = rng.uniform(1e-3, 1e-2, raw.shape[0]).astype(np.float16)
        raw[:, at : at + 2] = d.view(np.uint8).reshape(-1, 2)
    return torch.from_numpy(raw.reshape(-1))


def int8_bound(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """[M, N]: how far int8-quantizing x per 32 columns (d = max|x| / 127, round to nearest)
    can move x @ w.T: each x moves at most d / 2, so y moves at most |w| @ (d / 2); plus
    float32 rounding of the sums (1e-5 of |w| @ |x|, K = 512 terms)."""
    groups = x.view(x.shape[0], -1, 32)
    half_step = (groups.abs().amax(-1, keepdim=True) / 127 / 2).expand_as(groups).flatten(1)
    return half_step @ w.abs().T + 1e-5 * (x.abs() @ w.abs().T)


@pytest.mark.parametrize("ggml_type", TYPES, ids=lambda t: t.name)
def test_kquant_dense_is_ggml_dequantization(ggml_type):
    n, k = 40, 512
    raw = random_blocks(ggml_type, n, k)
    w = kernels.pack_quantized(*kquant_split(raw, ggml_type, (n, k)), ggml_type=ggml_type.name)
    assert torch.equal(w.dense(), dequantize(raw, ggml_type, (n, k)))  # bit-equal
    ids = torch.tensor([[39, 0], [17, 16]])  # rows of several blocks, as an embedding reads
    assert torch.equal(w.rows(ids), w.dense()[ids])


@pytest.mark.parametrize("rows", [1, 3, 9])  # 9: one full 8-row tile and one of 1
@pytest.mark.parametrize("ggml_type", TYPES, ids=lambda t: t.name)
def test_kquant_linear_matches_dequantized_matmul(ggml_type, rows):
    n, k = 40, 512  # N: two full 16-row blocks and a padded one
    raw = random_blocks(ggml_type, n, k, seed=rows)
    w = kernels.pack_quantized(*kquant_split(raw, ggml_type, (n, k)), ggml_type=ggml_type.name)
    dense = dequantize(raw, ggml_type, (n, k))
    gen = torch.Generator().manual_seed(rows)
    x, bias = torch.randn(rows, k, generator=gen), torch.randn(n, generator=gen)
    want = x.double() @ dense.double().T + bias.double()
    err = (kernels.linear(x, w, bias).double() - want).abs()
    bound = int8_bound(x.double(), dense.double())
    assert (err <= bound).all(), (err / bound).max()
    assert err.max() > 0  # the int8 path ran, not a dense float one


def test_kquant_rejects_parts_that_do_not_fit():
    q = torch.zeros(16, 256, dtype=torch.uint8)
    with pytest.raises(tinyformers.TinyformersError, match="q6_k"):  # Q6_K: a scale per 16
        kernels.pack_quantized(q, torch.ones(16, 8), ggml_type="Q6_K")


@pytest.mark.slow
def test_gemma3_q4_k_m_runs_on_its_own_blocks(capsys):
    path = gemma3_gguf()
    native = tinyformers.load(path, quantize="gguf")
    assert "run dense" not in capsys.readouterr().err  # every matrix on its blocks
    formats = {m.weight.fmt for m in native.net.modules() if isinstance(m, PackedLinear)}
    assert formats == {"int8", "q5_0", "q4_k", "q6_k"}  # Q8_0 head and v, and the file's others
    reference = tinyformers.load(path)  # dequantized to float32
    ids = [2, 818, 5279, 529, 7001, 563]  # BOS "The capital of France is"
    seq = ids + reference.generate_ids(ids, 16, temperature=0)
    with torch.inference_mode():
        want = reference.net(torch.tensor([seq]))[0, len(ids) - 1 : -1].log_softmax(-1)
        # the native model decodes the same tokens one at a time: its fused decode path
        cache = native.net.make_cache(1, len(seq))
        prefill = native.net(torch.tensor([ids]), cache=cache, input_pos=torch.arange(len(ids)))
        got = [prefill[0, -1]]
        for t in range(len(ids), len(seq) - 1):
            step = native.net(torch.tensor([[seq[t]]]), cache=cache, input_pos=torch.tensor([t]))
            got.append(step[0, -1])
        got = torch.stack(got).log_softmax(-1)
    # the same top 5 first (int8 activations move logits by ~0.1: tokens 0.04 apart may swap)
    assert set(got[0].topk(5).indices.tolist()) == set(want[0].topk(5).indices.tolist())
    # Judged by KL against float32, as the issue asks (a greedy text re-rolls where two tokens
    # are close): the weights are the file's exactly, only x is rounded to int8 per 32
    # columns. Measured over these 16 steps: mean 0.002, max 0.006 nats; 5x margin.
    kl = (want.exp() * (want - got)).sum(-1)
    assert kl.mean() < 0.01 and kl.max() < 0.03, kl
