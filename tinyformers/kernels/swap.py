"""The fused paths, swapped into a packed model from outside its file (as gpt-fast's
quantize.py swaps nn.Linear for its own modules after load).

Each fused class is the model file's own module with a forward that runs the C++ ops of
fused.py for what they fit, and the written-out `super().forward()` otherwise: a prefill
where the bits must stay those of the written-out math, a hook listening (the fused ops never
form the values a hook asks for), `fast` off, no cache. `swap_in` reassigns `module.__class__`,
so parameters, hooks and names stay where they were.

- Llama: RMSNorm and SwiGLU in one pass each, q/k rotation and the cache write in one op,
  attention over the cache, and every layer of a decode step in one call (`Llama.run_layers`).
- Gemma 3: its norms, x / rms(x) * (1 + weight), as the C++ rms_norm with the gain
  1 + weight (the q/k norms too, inside the fused attention); the stacked q/k/v, then the same
  rotation, cache write and attention ops. GeGLU has no op of its own: it runs written out,
  on the stacked gate/up (one matmul).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from tinyformers.models import gemma3, llama
from tinyformers.models.kv_cache import KVCache

from . import fused


def few_rows(x: Tensor) -> bool:
    """Decode's few query rows (up to fused.ATTEND_ROWS, as `fused.attend`): there the fused
    rms_norm and silu_mul run; a prefill keeps the written-out math. Their last-bit roundings
    differ, and in the int8 and q4 modes any 1-ulp change re-rolls the int8 roundings of the
    activations: SmolLM2's perplexity on benchmarks/perplexity.txt moves by 0.3% (one sd),
    so prefill keeps the bits it had before the fused ops (docs/kernels.md)."""
    return x.dim() < 2 or x.shape[-2] <= fused.ATTEND_ROWS


def fits(module: nn.Module, x: Tensor) -> bool:
    """Whether a fused forward may run: the module's `fast` on, `x` float32 on the CPU with
    the kernels loaded and no autograd, and no hook listening."""
    return module.fast and fused.usable(x) and not module.hook.listening


class LlamaRMSNorm(llama.RMSNorm):
    fast = True  # `set_fast_path` turns it off and on, as the model's other fast paths

    def forward(self, x: Tensor) -> Tensor:
        if few_rows(x) and fits(self, x):
            return fused.rms_norm(x, self.weight, self.eps)
        return super().forward(x)


class LlamaMLP(llama.MLP):
    fast = True

    def forward(self, x: Tensor) -> Tensor:
        if few_rows(x) and fits(self, x):  # down(silu(gate) * up), the middle in one pass
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


class Llama(llama.Llama):
    """Every Block.forward of a decode step in one C++ call (`fused.llama_layers`): norms,
    packed matmuls, rotary, cache writes, attention and residual adds."""

    packed: tuple | None = None  # (layer 0's q/k/v data, every layer's weights, flattened)

    def run_layers(self, x, cos, sin, masks, cache, input_pos) -> Tensor:
        if (packed := self._packed(x, cache)) is None:
            return super().run_layers(x, cos, sin, masks, cache, input_pos)
        attn, eps = self.layers[0].self_attn, self.config.rms_norm_eps
        return fused.llama_layers(
            x, packed, cos, sin, cache, input_pos, masks, attn.n_head, eps, attn.scale
        )

    def _packed(self, x: Tensor, cache: list[KVCache] | None):
        """Every layer's weights, flattened, when `fused.llama_layers` can run this call: at
        most `fused.ATTEND_ROWS` query rows, layer 0's fused attention and MLP could run,
        every matrix packed for the kernels, not under torch.compile; else None."""
        attn, mlp = self.layers[0].self_attn, self.layers[0].mlp
        if cache is None or x.shape[1] > fused.ATTEND_ROWS:
            return None
        if torch.compiler.is_compiling():  # torch.compile traces (and fuses) the layers' ops
            return None
        if not (isinstance(attn, LlamaAttention) and isinstance(mlp, LlamaMLP)):
            return None
        if not (fits(attn, x) and fits(mlp, x)):
            return None
        key = attn.qkv_proj.weight._buffers.get("data")
        # subtle: looked up once, again when layer 0's matrix changes or `_apply` (.to()) runs
        if self.packed is None or self.packed[0] is not key:
            layers = [_layer_weights(block) for block in self.layers]
            flat = None
            if all(layer is not None for layer in layers):
                flat = [t for w, _ in layers for t in w], [v for _, m in layers for v in m]
            self.packed = (key, flat)
        return self.packed[1]

    def _apply(self, fn, *args, **kwargs):
        self.packed = None  # .to(), .float(), ...: the tensors may be new ones
        return super()._apply(fn, *args, **kwargs)


def _layer_weights(block: llama.Block) -> tuple[list, list[int]] | None:
    """A block's tensors for `fused.llama_layers`, or None when a matrix is not packed."""
    attn, mlp = block.self_attn, block.mlp
    norms = (block.input_layernorm, block.post_attention_layernorm)
    linears = (attn.qkv_proj, attn.o_proj, mlp.gate_up_proj, mlp.down_proj)
    return fused.layer_weights(norms, linears)


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
    gemma3.RMSNorm: (Gemma3RMSNorm, ""),
    gemma3.Attention: (Gemma3Attention, "qkv_proj"),
}


def swap_in(net: nn.Module) -> nn.Module:
    """Give each module of a packed `net` that has a fused class that class (where the
    matrices it needs are stacked: a GGUF mixing block kinds in q/k/v keeps them apart)."""
    for module in net.modules():
        fused_class, needs = FUSED.get(type(module), (None, ""))
        if fused_class is not None and (not needs or needs in module._modules):
            module.__class__ = fused_class
    return net
