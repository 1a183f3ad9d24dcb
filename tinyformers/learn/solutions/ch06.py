"""Chapter 6: unembedding (docs/learn/06-unembedding.md).

Write the body of each function, then run `tinyformers learn check 6`. `model` is
`tinyformers.load("shakespeare", fast=False)`: its final norm is `model.net.ln_f` (LayerNorm
with `.weight`, `.bias` and `.eps`), and `model.W_U` [C, V] is W_E transposed.
"""

import torch


def unembed(model, resid: torch.Tensor) -> torch.Tensor:
    """Logits [T, V] from the residual stream after the last block [T, C]: the final
    LayerNorm (gain and bias included), then times W_U [C, V]."""
    ln = model.net.ln_f
    centred = resid - resid.mean(-1, keepdim=True)
    normed = centred / torch.sqrt(centred.pow(2).mean(-1, keepdim=True) + ln.eps)
    return (normed * ln.weight + ln.bias) @ model.W_U  # [T, C] @ [C, V] -> [T, V]


def lens_top_tokens(model, text: str) -> list[str]:
    """The logit lens at the last position of `text`: the most likely next character read
    from the residual stream before each block, then after the last one (n_layer + 1
    characters: 5 for this model)."""
    _, cache = model.run_with_cache(text)
    n_layer = model.config.n_layer
    streams = [cache[f"blocks.{i}.hook_resid_pre"] for i in range(n_layer)]
    streams.append(cache[f"blocks.{n_layer - 1}.hook_resid_post"])
    return [model.tokenizer.decode([int(unembed(model, s[0])[-1].argmax())]) for s in streams]
