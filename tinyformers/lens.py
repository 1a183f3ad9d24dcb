"""Looking inside a running model: named activations, hooks that replace them, the logit lens.

The names are TransformerLens's, fired by the model files at the line that computes each value
(models/hooks.py). While a hook listens, attention and layer norm take their written-out path,
so the scores and the pattern exist; matrices stay as loaded (packed, quantized), so the values
are those of the model that generates.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn

# cache["pattern", 3] -> "blocks.3.attn.hook_pattern": the short names TransformerLens takes.
ATTENTION = ("q", "k", "v", "rot_q", "rot_k", "attn_scores", "pattern", "z")
MLP = ("pre", "post")


def act_name(short: str, layer: int) -> str:
    """The full name of `short` in block `layer`. Example: act_name("resid_pre", 0)."""
    if short in ATTENTION:
        return f"blocks.{layer}.attn.hook_{short}"
    if short in MLP:
        return f"blocks.{layer}.mlp.hook_{short}"
    if short in ("ln1", "ln2"):
        return f"blocks.{layer}.{short}.hook_normalized"
    return f"blocks.{layer}.hook_{short}"  # resid_pre, attn_out, resid_mid, mlp_out, resid_post


class ActivationCache(dict):
    """Activations by name, each [batch, ...]; `cache["pattern", L]` is short for
    `cache["blocks.L.attn.hook_pattern"]`."""

    def __getitem__(self, key: str | tuple[str, int]) -> Tensor:
        return super().__getitem__(act_name(*key) if isinstance(key, tuple) else key)


@contextmanager
def listening(net: nn.Module, fn: Callable[[str, Tensor], Tensor]) -> Iterator[None]:
    """Call `fn(name, value)` at every named point of `net` while the block runs."""
    if net.hooks.fn is not None:
        raise RuntimeError("a hook function is already set on this model")
    net.hooks.fn = fn
    try:
        yield
    finally:
        net.hooks.fn = None


def hook_names(net: nn.Module) -> list[str]:
    """Every name the model fires, in the order it computes them (one token, run once)."""
    names: list[str] = []
    with torch.inference_mode(), listening(net, lambda name, x: names.append(name) or x):
        net(torch.zeros(1, 1, dtype=torch.long, device=_device(net)))
    return names


def run_with_cache(
    net: nn.Module, ids: Tensor, mask: Tensor | None = None, names: list[str] | None = None
) -> tuple[Tensor, ActivationCache]:
    """(logits [B, T, V], the activations named in `names`, or all of them)."""
    wanted = None if names is None else set(names)
    cache = ActivationCache()

    def record(name: str, x: Tensor) -> Tensor:
        if wanted is None or name in wanted:
            cache[name] = x
        return x

    return _run(net, ids, mask, record, wanted or set()), cache


def run_with_hooks(
    net: nn.Module,
    ids: Tensor,
    mask: Tensor | None,
    hooks: list[tuple[str, Callable[[Tensor, str], Tensor | None]]],
) -> Tensor:
    """Logits with each `fn(value, name)` of `hooks` run at its named point; a returned
    tensor replaces the value (ablation, patching), None leaves it as it was."""
    by_name: dict[str, list] = {}
    for name, fn in hooks:
        by_name.setdefault(name, []).append(fn)

    def apply(name: str, x: Tensor) -> Tensor:
        for fn in by_name.get(name, ()):
            out = fn(x, name)
            x = x if out is None else out
        return x

    return _run(net, ids, mask, apply, set(by_name))


def _run(net: nn.Module, ids: Tensor, mask: Tensor | None, fn, wanted: set[str]) -> Tensor:
    """Logits of one forward with `fn` at every named point; a name in `wanted` that the
    forward never reached is a ValueError (the forward reaches every name the model has)."""
    seen: set[str] = set()

    def each(name: str, x: Tensor) -> Tensor:
        seen.add(name)
        return fn(name, x)

    with torch.inference_mode(), listening(net, each):
        logits = net(ids, mask)
    if unknown := sorted(wanted - seen):
        raise ValueError(
            f"no activation named {unknown[0]!r} (model.hook_names() lists the {len(seen)})"
        )
    return logits


def logit_lens(net: nn.Module, ids: Tensor) -> Tensor:
    """What the model would predict if it stopped before each block, and at the end:
    logits [n_layer + 1, T, V] for one sequence `ids` [1, T] (nostalgebraist, 2020).

    subtle: the final norm is recomputed on each layer's residual; reusing the scale of the
    last layer's (TransformerLens #1076) gives the early layers wrong probabilities.
    """
    n_layer = net.config.layer_count
    names = [act_name("resid_pre", i) for i in range(n_layer)]
    names.append(act_name("resid_post", n_layer - 1))
    _, cache = run_with_cache(net, ids, names=names)
    resid = torch.cat([cache[name] for name in names])  # (n_layer + 1, T, C)
    with torch.inference_mode():
        return net.unembed(resid)  # (n_layer + 1, T, V)


def _device(net: nn.Module) -> torch.device:
    return next(net.parameters()).device
