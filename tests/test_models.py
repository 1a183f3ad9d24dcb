"""What every registered architecture must do (mlx-lm's shared runner): the fast path (SDPA,
fused layer norm, packed and stacked kernel matrices) computes the written-out math, on a
left-padded batch, with the KV cache and without."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import left_padded_batch

from tinyformers.kernels.modules import PackedLinear, pack_model
from tinyformers.models import ARCHITECTURES, get_architecture, set_fast_path

VOCAB = 96
# A small config of each architecture file, with the features that change the math switched on.
SMALL = {
    "gpt2": {"vocab_size": VOCAB, "n_positions": 64, "n_embd": 64, "n_layer": 2, "n_head": 4},
    "llama": {  # grouped-query attention: 4 query heads share 2 key/value heads
        "vocab_size": VOCAB,
        "hidden_size": 64,
        "intermediate_size": 96,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "rope_theta": 1000.0,
    },
}


def random_model(arch_name: str, seed: int = 0) -> torch.nn.Module:
    arch = get_architecture(arch_name)
    torch.manual_seed(seed)
    net = arch.Model(arch.Config.from_dict(SMALL[arch_name])).eval().requires_grad_(False)
    with torch.no_grad():
        for p in net.parameters():  # norms and biases random too, so no term hides
            p.copy_(torch.randn_like(p) * (0.1 if p.dim() == 1 else 0.3) + (p.dim() == 1))
    return net


def run(net, ids, mask, cached: bool) -> torch.Tensor:
    """Logits for every position: one forward, or a prefill of 4 then one token a step."""
    with torch.inference_mode():
        if not cached:
            return net(ids, mask)
        B, T = ids.shape
        cache = net.make_cache(B, T)
        out = [net(ids[:, :4], mask, cache=cache, input_pos=torch.arange(4))]
        for t in range(4, T):
            out.append(net(ids[:, t : t + 1], mask, cache=cache, input_pos=torch.tensor([t])))
        return torch.cat(out, dim=1)


def test_every_registered_architecture_is_covered():
    assert set(ARCHITECTURES.values()) == set(SMALL)


@pytest.mark.parametrize("cached", [False, True], ids=["no-cache", "cache"])
@pytest.mark.parametrize("arch_name", sorted(SMALL))
def test_fast_path_equals_the_written_out_math(arch_name, cached):
    net = random_model(arch_name)
    ids, mask = left_padded_batch([9, 4, 7], VOCAB)
    set_fast_path(net, False)
    reference = run(net, ids, mask, cached)
    set_fast_path(net, True)
    fast = run(net, ids, mask, cached)
    assert torch.isfinite(reference).all()
    # fp32: SDPA and F.layer_norm sum in another order than the written-out lines; 1e-5 bound.
    assert (fast - reference).abs().max() < 1e-5


@pytest.mark.parametrize("cached", [False, True], ids=["no-cache", "cache"])
@pytest.mark.parametrize("arch_name", sorted(SMALL))
def test_packed_and_stacked_matrices_equal_the_checkpoints_own(arch_name, cached):
    net = random_model(arch_name)
    ids, mask = left_padded_batch([9, 4, 7], VOCAB)
    reference = run(net, ids, mask, cached)
    packed = pack_model(copy.deepcopy(net), "f32")
    set_fast_path(packed, True)
    if arch_name == "llama":  # q, k, v (and gate, up) stacked into one matrix at packing only
        attn, mlp = packed.layers[0].self_attn, packed.layers[0].mlp
        assert isinstance(attn.qkv_proj, PackedLinear) and not hasattr(attn, "q_proj")
        assert isinstance(mlp.gate_up_proj, PackedLinear) and not hasattr(mlp, "up_proj")
        assert hasattr(net.layers[0].self_attn, "q_proj")  # the model itself keeps them apart
    # The kernels' f32 dot products sum in 16-wide lanes, another order again: 1e-5 of the
    # largest logit (|logit| <= ~6 here; 2.4e-5 absolute measured on llama with the cache).
    error = (run(packed, ids, mask, cached) - reference).abs().max()
    assert error < 1e-5 * reference.abs().max()


def test_a_mixed_kind_group_stays_apart():
    """A GGUF whose q, k, v are not all of one block kind (Q8_0 beside Q4) keeps them apart."""
    from tinyformers.kernels import quantize_int8, quantize_q4

    net = random_model("llama")
    attn = net.layers[0].self_attn
    q8 = quantize_int8(attn.q_proj.weight.detach(), 32)  # Q8_0 blocks: (values, scales)
    q4 = quantize_q4(attn.k_proj.weight.detach())  # Q4_1 blocks: (values, scales, mins)
    blocks = {"layers.0.self_attn.q_proj": q8, "layers.0.self_attn.k_proj": q4}
    pack_model(net, "f32", quantized=blocks)
    assert attn.qkv_proj is None
    assert [attn.q_proj.weight.fmt, attn.k_proj.weight.fmt, attn.v_proj.weight.fmt] == [
        "int8",
        "q4",
        "f32",
    ]
    assert isinstance(net.layers[1].self_attn.qkv_proj, PackedLinear)  # all f32: stacked


@pytest.mark.parametrize("arch_name", sorted(SMALL))
def test_rows_at_their_own_positions_decode_as_if_alone(arch_name):
    """A continuous batch: prompts of 6 and 3 tokens prefilled alone into rows 0 and 1 of one
    cache, then decoded together, each row at its own slot ([B, 1] input_pos)."""
    net = random_model(arch_name)
    set_fast_path(net, True)
    g = torch.Generator().manual_seed(3)
    seqs = [torch.randint(0, VOCAB, (1, n), generator=g) for n in (9, 6)]
    prompt = [6, 3]
    with torch.inference_mode():
        alone = [net(s) for s in seqs]  # no cache: the reference
        cache = net.make_cache(2, 16)
        for row, (s, n) in enumerate(zip(seqs, prompt, strict=True)):
            rows = [c.rows(slice(row, row + 1)) for c in cache]
            logits = net(s[:, :n], cache=rows, input_pos=torch.arange(n))
            # fp32 over 16 cache slots instead of n keys: rounding, 1e-5 of the largest logit
            assert (logits - alone[row][:, :n]).abs().max() < 1e-5 * logits.abs().max()
        for step in range(3):
            pos = torch.tensor([[prompt[0] + step], [prompt[1] + step]])  # [B, 1]
            ids = torch.cat([s[:, p] for s, p in zip(seqs, pos[:, 0], strict=True)])[:, None]
            logits = net(ids, cache=cache, input_pos=pos)
            for row in range(2):
                expected = alone[row][0, pos[row, 0]]
                error = (logits[row, 0] - expected).abs().max()
                assert error < 1e-5 * expected.abs().max(), (row, step)
