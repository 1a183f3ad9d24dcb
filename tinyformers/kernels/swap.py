"""The fused paths, swapped into a packed model from outside its file (as gpt-fast's
quantize.py swaps nn.Linear for its own modules after load).

Each fused class is the model file's own module with a forward that runs the C++ ops of
fused.py for what they fit, and the written-out `super().forward()` otherwise: a prefill
where the bits must stay those of the written-out math, a hook listening (the fused ops never
form the values a hook asks for), `fast` off, no cache. `swap_in` reassigns `module.__class__`,
so parameters, hooks and names stay where they were.

- Llama: RMSNorm and SwiGLU in one pass each, q/k rotation and the cache write in one op,
  attention over the cache, and every layer of a decode step in one call (`Llama.run_layers`).
- GPT-2: each Block of a decode step in one C++ call (the same `decoder_layers` with layer
  norms, biases, no rotation and GELU); a float model's prefill GELU in one pass.
- Gemma 3: each Block of a decode step in one C++ call (`decoder_layers` with the q/k norms,
  the norms after each sublayer, the gain 1 + weight and GeGLU), its mask and angles those of
  the layer's kind. Outside it (q/k/v kept apart, torch.compile), its norms as the C++
  rms_norm with the gain 1 + weight, and the stacked q/k/v through the rotation, cache write
  and attention ops.
"""

from __future__ import annotations

from functools import partial

import torch
from torch import Tensor, nn

from tinyformers.models import gemma3, gpt2, llama
from tinyformers.models.kv_cache import KVCache

from . import fused
from .packed import PackedWeight


def few_rows(x: Tensor) -> bool:
    """Decode's few query rows (up to fused.ATTEND_ROWS, as `fused.attend`): there the fused
    rms_norm and silu_mul run; a prefill keeps the written-out math. Their last-bit roundings
    differ, and in the int8 and q4 modes any 1-ulp change re-rolls the int8 roundings of the
    activations: SmolLM2's perplexity on benchmarks/perplexity.txt moves by 0.3% (one sd),
    so their prefill keeps the bits it had before the fused ops (docs/kernels.md); a model
    of float matrices runs Llama's fused norm and SwiGLU in prefill too (`swap_in`)."""
    return x.dim() < 2 or x.shape[-2] <= fused.ATTEND_ROWS


def fits(module: nn.Module, x: Tensor) -> bool:
    """Whether a fused forward may run: the module's `fast` on, `x` float32 on the CPU with
    the kernels loaded and no autograd, and no hook listening."""
    return module.fast and fused.usable(x) and not module.hook.listening


class LlamaRMSNorm(llama.RMSNorm):
    fast = True  # `set_fast_path` turns it off and on, as the model's other fast paths
    prefill_fused = False  # `swap_in` sets it where every matrix is float (no int8 rounding)

    def forward(self, x: Tensor) -> Tensor:
        if (few_rows(x) or self.prefill_fused) and fits(self, x):
            return fused.rms_norm(x, self.weight, self.eps)
        return super().forward(x)


class LlamaMLP(llama.MLP):
    fast = True
    prefill_fused = False

    def forward(self, x: Tensor) -> Tensor:
        if (few_rows(x) or self.prefill_fused) and fits(self, x):  # silu(gate) * up in one pass
            return self.down_proj(fused.silu_mul(self.gate_up_proj(x)))
        return super().forward(x)


class LlamaAttention(llama.Attention):
    def forward(
        self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor, cache: KVCache | None, input_pos
    ) -> Tensor:
        if cache is None or not fits(self, x):
            return super().forward(x, cos, sin, mask, cache, input_pos)
        # rotate q and k, write k and v into the cache, then attention over the cache with
        # each kv head read once: two C++ ops
        q = fused.rope_cache(self.qkv_proj(x), cos, sin, cache, input_pos, self.n_head)
        z = fused.attend(q, cache, mask, self.scale, input_pos)  # (B, T, nh*hs)
        return self.o_proj(z)  # (B, T, nh*hs) -> (B, T, C)


def one_call_fits(x: Tensor, cache, attn: nn.Module) -> bool:
    """Whether `fused.decoder_layers` may run a decode step's layers: a cache, at most
    `fused.ATTEND_ROWS` query rows, the attention's fused path could run (`fits`: fast on,
    float32 on the CPU, no hook listening), not under torch.compile (which traces the ops)."""
    return (
        cache is not None
        and x.shape[1] <= fused.ATTEND_ROWS
        and not torch.compiler.is_compiling()
        and fits(attn, x)
    )


def packed_data(linear: nn.Module) -> Tensor | None:
    """A projection's packed matrix (what says the weights changed), or None if not packed."""
    w = getattr(linear, "weight", None)
    return w._buffers["data"] if isinstance(w, PackedWeight) else None


class OneCall:
    """Holds the weights `fused.decoder_layers` takes, looked up once, again when the packed
    matrix `key` changes or `_apply` (.to(), .float()) runs: the tensors may be new ones."""

    packed: tuple | None = None  # (key, the weights flattened, or None: not every one packed)

    def one_call_weights(self, key: Tensor | None, layers) -> tuple[list, list[int]] | None:
        if key is None:
            return None
        if self.packed is None or self.packed[0] is not key:
            weights = [layer_weights() for layer_weights in layers]
            flat = None
            if all(w is not None for w in weights):
                flat = [t for w, _ in weights for t in w], [v for _, m in weights for v in m]
            self.packed = (key, flat)
        return self.packed[1]

    def _apply(self, fn, *args, **kwargs):
        self.packed = None
        return super()._apply(fn, *args, **kwargs)


class Llama(OneCall, llama.Llama):
    """Every Block.forward of a decode step in one C++ call (`fused.decoder_layers`): norms,
    packed matmuls, rotary, cache writes, attention and residual adds."""

    def run_layers(self, x, cos, sin, masks, cache, input_pos) -> Tensor:
        if (packed := self._packed(x, cache)) is None:
            return super().run_layers(x, cos, sin, masks, cache, input_pos)
        attn, n = self.layers[0].self_attn, len(self.layers)
        return fused.decoder_layers(
            x, packed, [(cos, sin)] * n, cache, input_pos, masks, [attn.scale] * n,
            activation="silu_gated", n_head=attn.n_head, eps=self.config.rms_norm_eps,
        )  # fmt: skip

    def _packed(self, x: Tensor, cache: list[KVCache] | None):
        """Every layer's weights, flattened, when `fused.decoder_layers` can run this call
        (layer 0's fused attention and MLP could run, every matrix packed), else None."""
        attn, mlp = self.layers[0].self_attn, self.layers[0].mlp
        if not (isinstance(attn, LlamaAttention) and isinstance(mlp, LlamaMLP)):
            return None
        if not (one_call_fits(x, cache, attn) and fits(mlp, x)):
            return None
        layers = [partial(_llama_weights, block) for block in self.layers]
        return self.one_call_weights(packed_data(attn.qkv_proj), layers)


def _llama_weights(block: llama.Block) -> tuple[list, list[int]] | None:
    """A block's tensors for `fused.decoder_layers`, or None when a matrix is not packed."""
    attn, mlp = block.self_attn, block.mlp
    norms = [block.input_layernorm.weight, None, block.post_attention_layernorm.weight]
    linears = (attn.qkv_proj, attn.o_proj, mlp.gate_up_proj, mlp.down_proj)
    return fused.layer_weights(norms + [None] * 5, linears)


class GPT2Block(OneCall, gpt2.Block):
    """The block of a decode step in one C++ call (`fused.decoder_layers`): layer norms,
    packed matmuls with their biases, the cache write (no rotation: GPT-2's positions are
    added to the embeddings), attention, GELU and residual adds."""

    def forward(self, x: Tensor, mask: Tensor, cache: KVCache | None, input_pos) -> Tensor:
        attn = self.attn
        if self.training or not one_call_fits(x, cache, attn):  # training: dropout
            return super().forward(x, mask, cache, input_pos)
        if (packed := self.one_call_weights(packed_data(attn.c_attn), [self._weights])) is None:
            return super().forward(x, mask, cache, input_pos)
        return fused.decoder_layers(
            x, packed, [None], [cache], input_pos, [mask], [attn.scale],
            activation="gelu_tanh", n_head=attn.n_head, eps=self.ln_1.eps,
        )  # fmt: skip

    def _weights(self) -> tuple[list, list[int]] | None:
        attn, mlp, ln_1, ln_2 = self.attn, self.mlp, self.ln_1, self.ln_2
        if mlp.act not in GELU_TANH or ln_1.eps != ln_2.eps:  # the others: written out
            return None
        norms = [ln_1.weight, ln_1.bias, ln_2.weight, ln_2.bias] + [None] * 4
        return fused.layer_weights(norms, (attn.c_attn, attn.c_proj, mlp.c_fc, mlp.c_proj))


GELU_TANH = (gpt2.ACTIVATIONS["gelu_new"], gpt2.ACTIVATIONS["gelu_pytorch_tanh"])


class GPT2MLP(gpt2.MLP):
    """A float model's prefill: GELU in one C++ pass (decode runs the whole block in
    GPT2Block's one call)."""

    fast = True
    prefill_fused = False  # `swap_in` sets it where every matrix is float (no int8 rounding)

    def forward(self, x: Tensor) -> Tensor:
        if self.prefill_fused and self.act in GELU_TANH and fits(self, x):
            return self.c_proj(fused.gelu_tanh(self.c_fc(x)))
        return super().forward(x)


class Gemma3Block(OneCall, gemma3.Block):
    """The block of a decode step in one C++ call (`fused.decoder_layers`): the four norms
    (gain 1 + weight), q/k norms, rotary by this layer's angles, cache write, attention under
    this layer's mask (its window), GeGLU and residual adds."""

    def forward(self, x, cos, sin, mask, cache, input_pos) -> Tensor:
        attn = self.self_attn
        key = packed_data(getattr(attn, "qkv_proj", None))  # None: q, k, v kept apart
        if not one_call_fits(x, cache, attn) or key is None:
            return super().forward(x, cos, sin, mask, cache, input_pos)
        if (packed := self.one_call_weights(key, [self._weights])) is None:
            return super().forward(x, cos, sin, mask, cache, input_pos)
        return fused.decoder_layers(
            x, packed, [(cos, sin)], [cache], input_pos, [mask], [attn.scale],
            activation="gelu_tanh_gated", n_head=attn.n_head, eps=self.input_layernorm.eps,
            gain_plus_one=True,
        )  # fmt: skip

    def _weights(self) -> tuple[list, list[int]] | None:
        attn, mlp = self.self_attn, self.mlp
        norms = [
            self.input_layernorm, self.post_attention_layernorm, self.pre_feedforward_layernorm,
            self.post_feedforward_layernorm, attn.q_norm, attn.k_norm,
        ]  # fmt: skip
        if len({norm.eps for norm in norms}) > 1 or not hasattr(mlp, "gate_up_proj"):
            return None
        ln1, post1, ln2, post2, q_norm, k_norm = (norm.weight for norm in norms)
        norms = [ln1, None, ln2, None, post1, post2, q_norm, k_norm]
        return fused.layer_weights(
            norms, (attn.qkv_proj, attn.o_proj, mlp.gate_up_proj, mlp.down_proj)
        )


class Gemma3RMSNorm(gemma3.RMSNorm):
    fast = True

    def forward(self, x: Tensor) -> Tensor:
        # (B, T, C) of a decode step only: the q/k norms see (B, T, heads, hs) in the
        # written-out attention, where T may be a prefill's
        if x.dim() == 3 and few_rows(x) and fits(self, x):
            return _gemma_norm(self, x)
        return super().forward(x)


class Gemma3Attention(gemma3.Attention):
    def forward(
        self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor, cache: KVCache | None, input_pos
    ) -> Tensor:
        if cache is None or not few_rows(x) or not fits(self, x):
            return super().forward(x, cos, sin, mask, cache, input_pos)
        B, T, _ = x.shape
        nh, nkv, hs = self.n_head, self.n_kv_head, self.head_dim
        q, k, v = self.qkv_proj(x).split([nh * hs, nkv * hs, nkv * hs], dim=-1)
        q = _gemma_norm(self.q_norm, q.reshape(B, T, nh, hs))  # each head to rms 1, its gain
        k = _gemma_norm(self.k_norm, k.reshape(B, T, nkv, hs))
        qkv = torch.cat([q.view(B, T, -1), k.view(B, T, -1), v], dim=-1)  # (B, T, (nh+2nkv)hs)
        q = fused.rope_cache(qkv, cos, sin, cache, input_pos, nh)  # (B, nh, T, hs)
        z = fused.attend(q, cache, mask, self.scale, input_pos)  # (B, T, nh*hs)
        return self.o_proj(z)  # (B, T, nh*hs) -> (B, T, C)


def _gemma_norm(norm: gemma3.RMSNorm, x: Tensor) -> Tensor:
    """Gemma's x / rms(x) * (1 + weight) as the C++ rms_norm with the gain 1 + weight."""
    return fused.rms_norm(x, 1.0 + norm.weight, norm.eps)


# model class -> its fused class, and the stacked matrix that class needs ("" for none)
FUSED: dict[type, tuple[type, str]] = {
    llama.RMSNorm: (LlamaRMSNorm, ""),
    llama.MLP: (LlamaMLP, "gate_up_proj"),
    llama.Attention: (LlamaAttention, "qkv_proj"),
    llama.Llama: (Llama, ""),
    gpt2.Block: (GPT2Block, ""),
    gpt2.MLP: (GPT2MLP, ""),
    gemma3.RMSNorm: (Gemma3RMSNorm, ""),
    gemma3.Attention: (Gemma3Attention, "qkv_proj"),
    gemma3.Block: (Gemma3Block, ""),
}


def swap_in(net: nn.Module) -> nn.Module:
    """Give each module of a packed `net` that has a fused class that class (where the
    matrices it needs are stacked: a GGUF mixing block kinds in q/k/v keeps them apart).

    Where every matrix is float32 or bfloat16, Llama's fused norm and SwiGLU and GPT-2's
    GELU run in prefill too: there a last-bit difference stays a last-bit difference (no int8
    rounding of the activations to flip; `few_rows`), and the two ops in place of seven per
    layer made SmolLM2's bfloat16 128-token prefill 1276 -> 1430 and 1289 -> 1377 tok/s
    (Intel Xeon); GPT-2's GELU, 2244 -> 2355.
    """
    exact = all(w.fmt in ("f32", "bf16") for w in net.modules() if isinstance(w, PackedWeight))
    for module in net.modules():
        fused_class, needs = FUSED.get(type(module), (None, ""))
        if fused_class is not None and (not needs or needs in module._modules):
            module.__class__ = fused_class
            if hasattr(fused_class, "prefill_fused"):
                module.prefill_fused = exact
    return net
