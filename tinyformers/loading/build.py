"""Build a model of known shape on the meta device, then assign the checkpoint's tensors.

Building on the meta device allocates nothing, so no time goes into a random init that the
checkpoint overwrites (transformers PR #21879); the loaded tensors become the parameters.
Loading is strict: every parameter must be in the checkpoint with its exact shape, and every
tensor in the checkpoint must be used (buffers known to be junk are dropped by name in
`sanitize`, never by loosening the check).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import Tensor, nn

from tinyformers.errors import CheckpointError


@contextmanager
def _skip_init() -> Iterator[None]:
    """Modules initialise their weights in __init__; on the meta device that is wasted work, and
    `normal_` there imports torch's Python decompositions (70 MB of RSS, a second of load)."""
    names = ("normal_", "uniform_", "kaiming_uniform_", "zeros_", "ones_")
    saved = {name: getattr(nn.init, name) for name in names}
    for name in names:
        setattr(nn.init, name, lambda tensor, *args, **kwargs: tensor)
    try:
        yield
    finally:
        for name, fn in saved.items():
            setattr(nn.init, name, fn)


def _finite(w: Tensor) -> bool:
    """No NaN or inf in the contiguous `w`, checked 4M values at a time (no copy of it)."""
    flat = w.view(-1)
    step = 1 << 22
    return all(torch.isfinite(flat[i : i + step]).all() for i in range(0, flat.numel(), step))


def build_meta(model_class: type[nn.Module], config, source: Path) -> nn.Module:
    """`model_class(config)` on the meta device: shapes only, no memory."""
    try:
        with torch.device("meta"), _skip_init():
            return model_class(config)
    except (RuntimeError, ValueError, ArithmeticError) as e:  # sizes whose product overflows
        raise CheckpointError(f"{source}: the config describes no model that can exist: {e}") from e


def build(
    model_class: type[nn.Module],
    config,
    weights: dict[str, Tensor],
    dtype: torch.dtype,
    device: torch.device,
    source: Path,
) -> nn.Module:
    """`model_class(config)` with `weights` (our names and layout) as its parameters."""
    model = build_meta(model_class, config, source)
    params = dict(model.named_parameters(remove_duplicate=False))
    canonical: dict[int, str] = {}  # tied parameters (lm_head = wte) share the first name
    names = {name: canonical.setdefault(id(p), name) for name, p in params.items()}
    if missing := sorted(set(names.values()) - weights.keys()):
        raise CheckpointError(f"{source}: missing tensor {missing[0]} ({len(missing)} missing)")
    if unexpected := sorted(weights.keys() - set(names.values())):
        raise CheckpointError(
            f"{source}: unexpected tensor {unexpected[0]} ({len(unexpected)} not used by the model)"
        )
    ready: dict[str, Tensor] = {}
    for name in list(weights):
        w = weights.pop(name)  # one tensor at a time: never two copies of the whole model
        if w.shape != params[name].shape:
            raise CheckpointError(
                f"{source}: tensor {name} has shape {tuple(w.shape)}, "
                f"expected {tuple(params[name].shape)}"
            )
        ready[name] = w.to(device=device, dtype=dtype).contiguous()
        if not _finite(ready[name]):
            # a file may hold NaN or inf (a bit flip, a bad conversion): refuse it here, not
            # as a failed draw at the first sampled token
            raise CheckpointError(f"{source}: tensor {name} holds NaN or infinite values")
    model.load_state_dict({alias: ready[name] for alias, name in names.items()}, assign=True)
    for alias, name in names.items():  # re-tie: lm_head.weight is wte.weight, the same Parameter
        if alias != name:
            owner, attr = alias.rsplit(".", 1)
            setattr(model.get_submodule(owner), attr, model.get_parameter(name))
    return model.eval().requires_grad_(False)
