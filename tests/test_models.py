"""What every registered architecture must do (mlx-lm's shared runner), on a small random model
of each with the features that change its math switched on:
- Hugging Face parity: HF's model, its state_dict through our `sanitize` and loader, the same
  logits on a left-padded batch within 1e-4 in fp32;
- parameter names: `sanitize` maps HF's tensors onto ours, none missing, none left over;
- the KV cache changes nothing, nor does the batch (each row alone gives its row);
- the fast path (SDPA, fused layer norm, packed and stacked kernel matrices) computes the
  written-out math.

Adding an architecture is one entry in CASES: the HF class and a small HF config.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from conftest import hf_logits, left_padded_batch

from tinyformers.kernels.modules import PackedLinear, RowSlice, pack_model
from tinyformers.loading.loader import build
from tinyformers.models import ARCHITECTURES, get_architecture, set_fast_path

VOCAB = 96
MODELS = Path(__file__).resolve().parent.parent / "tinyformers" / "models"
# The Llama-family shapes every case below shares: 4 query heads of 16 share 2 key/value heads.
LLAMA_SHAPES = {
    "vocab_size": VOCAB,
    "hidden_size": 64,
    "intermediate_size": 96,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 64,
}


@dataclass
class Case:
    """A small model of one registered `model_type`: HF's class (the reference) and the config
    it is built from, whose JSON is the config.json we load. `off` switches the case's feature
    off, so a test can show that the feature changes the logits (no vacuous parity)."""

    hf_class: str
    config: dict
    off: dict = field(default_factory=dict)
    wrapper: str = ""  # a model_type whose config.json nests this one under "text_config"

    @property
    def model_type(self) -> str:
        """The registered name our loader reads from config.json."""
        return self.wrapper or self.config["model_type"]


GEMMA3_TEXT = {  # one sliding layer (window 3 on 9-token prompts), then one global layer
    "model_type": "gemma3_text",
    **LLAMA_SHAPES,
    "head_dim": 16,
    "query_pre_attn_scalar": 16,
    "sliding_window": 3,
    "layer_types": ["sliding_attention", "full_attention"],
}
CASES = {
    "gpt2": Case(
        "GPT2LMHeadModel",
        {"model_type": "gpt2", "vocab_size": VOCAB, "n_positions": 64, "n_embd": 64}
        | {"n_layer": 2, "n_head": 4, "bos_token_id": 0, "eos_token_id": 0},
    ),
    "llama": Case(  # GQA and Llama 3.1's RoPE (most pairs turn slower; 8 old positions)
        "LlamaForCausalLM",
        {"model_type": "llama", **LLAMA_SHAPES, "tie_word_embeddings": True}
        | {
            "rope_parameters": {
                "rope_type": "llama3",
                "rope_theta": 1000.0,
                "factor": 4.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8,
            }
        },
        off={"rope_parameters": {"rope_type": "default", "rope_theta": 1000.0}},
    ),
    "llama-linear-rope": Case(
        "LlamaForCausalLM",
        {"model_type": "llama", **LLAMA_SHAPES, "attention_bias": True, "mlp_bias": True}
        | {"rope_parameters": {"rope_type": "linear", "rope_theta": 1000.0, "factor": 2.0}},
        off={"rope_parameters": {"rope_type": "default", "rope_theta": 1000.0}},
    ),
    "mistral": Case(  # a 3-token window on prompts of up to 9: most keys fall outside it
        "MistralForCausalLM",
        {"model_type": "mistral", **LLAMA_SHAPES, "sliding_window": 3},
        off={"sliding_window": None},
    ),
    "qwen2": Case(  # biases on q, k, v (random), none on o
        "Qwen2ForCausalLM",
        {"model_type": "qwen2", **LLAMA_SHAPES},
    ),
    "qwen2-sliding": Case(  # the window on layers from max_window_layers (1) on
        "Qwen2ForCausalLM",
        {"model_type": "qwen2", **LLAMA_SHAPES, "use_sliding_window": True}
        | {"sliding_window": 3, "max_window_layers": 1},
        off={"use_sliding_window": False},
    ),
    "gemma3_text": Case("Gemma3ForCausalLM", GEMMA3_TEXT, off={"sliding_window": 64}),
    "gemma3": Case(  # the multimodal config's name: the text model's config nested inside
        "Gemma3ForCausalLM", GEMMA3_TEXT, off={"sliding_window": 64}, wrapper="gemma3"
    ),
}
PROMPTS = [9, 4, 7]  # left-padded to 9


def hf_model(case: Case, seed: int = 0, **overrides) -> torch.nn.Module:
    """HF's model of `case` in fp32 with random weights large enough that every term shows:
    matrices N(0, 0.2), and norms and biases moved N(0, 0.1) off HF's init (1 or 0)."""
    import transformers

    cls = getattr(transformers, case.hf_class)
    config = cls.config_class(**{**case.config, **overrides}, attn_implementation="eager")
    torch.manual_seed(seed)
    model = cls(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1) if p.dim() == 1 else p.normal_(0.0, 0.2)
    return model


def config_json(case: Case, hf: torch.nn.Module) -> dict:
    """The config.json HF writes for `hf`, under the name `case` registers."""
    config = json.loads(hf.config.to_json_string())
    return {"model_type": case.wrapper, "text_config": config} if case.wrapper else config


def ours(case: Case, hf: torch.nn.Module) -> torch.nn.Module:
    """Our model of `hf`, loaded as a checkpoint folder is: config.json, sanitize, build."""
    arch = get_architecture(case.model_type)
    config = arch.Config.from_dict(config_json(case, hf))
    weights = arch.sanitize(dict(hf.state_dict()), config)
    net = build(
        arch.Model, config, weights, torch.float32, torch.device("cpu"), Path(case.hf_class)
    )
    set_fast_path(net, True)  # as `load` gives it
    return net


def needs_file(case_name: str) -> None:
    """Skip a case whose architecture file is not written yet (registered ahead of it)."""
    module = ARCHITECTURES[CASES[case_name].model_type]
    if not (MODELS / f"{module}.py").exists():
        pytest.skip(f"tinyformers/models/{module}.py is not written yet")


def random_model(case_name: str, seed: int = 0) -> torch.nn.Module:
    """Our model of a random HF model of `case_name`, fast path on."""
    needs_file(case_name)
    return ours(CASES[case_name], hf_model(CASES[case_name], seed))


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
    assert set(ARCHITECTURES) <= {case.model_type for case in CASES.values()}


@pytest.mark.parametrize("name", CASES)
def test_parameter_names_map_onto_ours_with_none_missing_or_left_over(name):
    needs_file(name)
    case = CASES[name]
    hf = hf_model(case)
    arch = get_architecture(case.model_type)
    config = arch.Config.from_dict(config_json(case, hf))
    with torch.device("meta"):
        expected = {n for n, _ in arch.Model(config).named_parameters()}  # tied: one name
    assert set(arch.sanitize(dict(hf.state_dict()), config)) == expected


@pytest.mark.parametrize("name", CASES)
def test_random_weights_match_hf(name):
    needs_file(name)
    case = CASES[name]
    hf = hf_model(case)
    ids, mask = left_padded_batch(PROMPTS, VOCAB)
    expected = hf_logits(hf, ids, mask)
    real = mask.bool()  # padding positions' outputs are junk nothing reads
    error = (run(ours(case, hf), ids, mask, cached=False) - expected)[real].abs().max()
    assert error <= 1e-4, error  # issue 15: 1e-4 in fp32
    if case.off:  # the feature switched on above changes the logits: the parity means something
        other = hf_logits(hf_model(case, **case.off), ids, mask)
        assert (other - expected)[real].abs().max() > 1e-2


@pytest.mark.parametrize("name", CASES)
def test_cached_equals_uncached_and_batched_equals_alone(name):
    net = random_model(name)
    ids, mask = left_padded_batch(PROMPTS, VOCAB)
    batched = run(net, ids, mask, cached=False)
    scale = batched[mask.bool()].abs().max()
    # fp32: another order of sums over the cache's slots or the padding; 1e-5 of the largest
    cached = run(net, ids, mask, cached=True)
    assert (cached - batched)[mask.bool()].abs().max() < 1e-5 * scale
    for row, n in enumerate(PROMPTS):
        alone = run(net, ids[row : row + 1, -n:], None, cached=False)
        assert (alone[0] - batched[row, -n:]).abs().max() < 1e-5 * scale, row


@pytest.mark.parametrize("cached", [False, True], ids=["no-cache", "cache"])
@pytest.mark.parametrize("name", CASES)
def test_fast_path_equals_the_written_out_math(name, cached):
    net = random_model(name)
    ids, mask = left_padded_batch(PROMPTS, VOCAB)
    set_fast_path(net, False)
    reference = run(net, ids, mask, cached)
    set_fast_path(net, True)
    fast = run(net, ids, mask, cached)
    assert torch.isfinite(reference).all()
    # fp32: SDPA and F.layer_norm sum in another order than the written-out lines; 1e-5 of the
    # largest logit.
    assert (fast - reference).abs().max() < 1e-5 * reference.abs().max()


@pytest.mark.parametrize("cached", [False, True], ids=["no-cache", "cache"])
@pytest.mark.parametrize("name", CASES)
def test_packed_and_stacked_matrices_equal_the_checkpoints_own(name, cached):
    net = random_model(name)
    ids, mask = left_padded_batch(PROMPTS, VOCAB)
    reference = run(net, ids, mask, cached)
    packed = pack_model(copy.deepcopy(net), "f32")
    set_fast_path(packed, True)
    if ARCHITECTURES[CASES[name].model_type] != "gpt2":  # q, k, v (gate, up) stacked at packing
        attn, mlp = packed.layers[0].self_attn, packed.layers[0].mlp
        assert isinstance(attn.qkv_proj, PackedLinear) and isinstance(attn.q_proj, RowSlice)
        assert isinstance(mlp.gate_up_proj, PackedLinear) and isinstance(mlp.up_proj, RowSlice)
        assert isinstance(net.layers[0].self_attn.q_proj, torch.nn.Linear)  # the model's own
    # The kernels' f32 dot products sum in 16-wide lanes, another order again: 1e-5 of the
    # largest logit.
    error = (run(packed, ids, mask, cached) - reference).abs().max()
    assert error < 1e-5 * reference.abs().max()


def test_a_mixed_kind_group_stays_apart():
    """A GGUF whose q, k, v are not all of one block kind (Q8_0 beside Q4) keeps them apart."""
    from tinyformers.kernels import quantize_int8, quantize_q4

    net = random_model("llama")
    attn = net.layers[0].self_attn
    # as gguf_model hands them over: (ggml type, values, scales[, mins])
    q8 = ("Q8_0", *quantize_int8(attn.q_proj.weight.detach(), 32))
    q4 = ("Q4_1", *quantize_q4(attn.k_proj.weight.detach()))
    blocks = {"layers.0.self_attn.q_proj": q8, "layers.0.self_attn.k_proj": q4}
    pack_model(net, "f32", quantized=blocks)
    assert not hasattr(attn, "qkv_proj")
    assert [attn.q_proj.weight.fmt, attn.k_proj.weight.fmt, attn.v_proj.weight.fmt] == [
        "int8",
        "q4",
        "f32",
    ]
    assert isinstance(net.layers[1].self_attn.qkv_proj, PackedLinear)  # all f32: stacked


# Fused decode against the same packed model's written-out lines: float32 sums in another
# order, 1e-5 of the largest logit (measured <= 1.2e-6). bf16 and int8 round the activations
# going into each matmul (to bf16, or to int8 steps of 1/127 of a group's largest value), so a
# 1-ulp change rerolls a rounding: measured up to 3e-3 (bf16) and 6e-3 (int8) over 3 seeds;
# 2e-2, where a wrong activation, norm or mask moves the logits by O(1).
ONE_CALL_TOLERANCE = {"f32": 1e-5, "bf16": 2e-2, "int8": 2e-2}


@pytest.mark.parametrize("fmt", ONE_CALL_TOLERANCE)
@pytest.mark.parametrize("name", CASES)
def test_one_call_decode_equals_the_written_out_layers(name, fmt, monkeypatch):
    """Cached steps of up to 16 rows through `fused.decoder_layers` (each layer's norms,
    matmuls, q/k norms, rotation or none, cache write, attention under the layer's mask,
    activation and residual adds in one C++ call) give the logits of the same packed model's
    written-out lines (`fast` off), left padding and windows included."""
    from tinyformers.kernels import fused

    net = pack_model(random_model(name), fmt)
    ids, mask = left_padded_batch(PROMPTS, VOCAB)
    set_fast_path(net, False)
    reference = run(net, ids, mask, cached=True)
    calls = []
    one_call = fused.decoder_layers
    monkeypatch.setattr(
        fused, "decoder_layers", lambda *a, **kw: [calls.append(1), one_call(*a, **kw)][1]
    )
    set_fast_path(net, True)
    fast = run(net, ids, mask, cached=True)
    assert calls  # the prefill of 4 and every step went through it
    error = (fast - reference).abs().max() / reference.abs().max()
    assert error < ONE_CALL_TOLERANCE[fmt], error


@pytest.mark.parametrize("name", CASES)
def test_a_hook_sees_the_written_out_values_beside_the_one_call_path(name, monkeypatch):
    """With a hook listening, a packed model's cached decode runs the written-out lines (the
    one C++ call never forms the values a hook reads): every hooked value as with `fast` off."""
    from tinyformers.kernels import fused

    net = pack_model(random_model(name), "f32")
    ids, mask = left_padded_batch(PROMPTS, VOCAB)

    def hooked(fast: bool) -> dict[str, list[torch.Tensor]]:
        seen: dict[str, list[torch.Tensor]] = {}
        net.hooks.fn = lambda point, x: [seen.setdefault(point, []).append(x.clone()), x][1]
        set_fast_path(net, fast)
        try:
            run(net, ids, mask, cached=True)
        finally:
            net.hooks.fn = None
        return seen

    monkeypatch.setattr(fused, "decoder_layers", None)  # called: a TypeError
    reference, fast = hooked(False), hooked(True)
    assert "blocks.1.hook_resid_post" in fast and fast.keys() == reference.keys()
    for point, values in reference.items():
        for r, f in zip(values, fast[point], strict=True):
            # the same lines on the same values; SDPA and F.layer_norm do not run with a hook
            assert torch.equal(r, f), point


@pytest.mark.parametrize("name", CASES)
def test_rows_at_their_own_positions_decode_as_if_alone(name):
    """A continuous batch: prompts of 6 and 3 tokens prefilled alone into rows 0 and 1 of one
    cache, then decoded together, each row at its own slot ([B, 1] input_pos)."""
    net = random_model(name)
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
