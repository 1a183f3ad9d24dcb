"""Checkpoint -> model: pick the architecture, build it on the meta device, assign the weights.

Building on the meta device allocates nothing, so no time goes into a random init that the
checkpoint overwrites (transformers PR #21879); the loaded tensors become the parameters.
Loading is strict: every parameter must be in the checkpoint with its exact shape, and every
tensor in the checkpoint must be used (buffers known to be junk are dropped by name in
`sanitize`, never by loosening the check).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import Tensor, nn

from tinyformers.errors import CheckpointError
from tinyformers.loading.checkpoint import map_weights, read_weights
from tinyformers.loading.hub import resolve
from tinyformers.loading.json_file import read_json
from tinyformers.models import check_layer_count, get_architecture

DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


def parse_dtype(dtype: str | torch.dtype | None) -> torch.dtype:
    """float32 unless asked: on CPU fp16/bf16 are not reliably faster and lose precision."""
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype) and dtype in DTYPES.values():
        return dtype
    if isinstance(dtype, str) and dtype in DTYPES:
        return DTYPES[dtype]
    raise ValueError(f"dtype {dtype!r} is not supported (expected float32, bfloat16 or float16)")


def parse_device(device: str | torch.device | None) -> torch.device:
    device = torch.device(device or "cpu")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device} requested but CUDA is not available")
    return device


def load_model(
    name_or_path: str | os.PathLike,
    dtype: str | torch.dtype | None = None,
    device: str | torch.device | None = None,
    native_gguf: bool = False,
    shard=None,
) -> tuple[nn.Module, Path]:
    """The model of a checkpoint folder (or name) and the folder it came from.

    native_gguf: a GGUF's quantized matrices run as stored (see `load_gguf_model`).
    shard: a `parallel.Shard`: build this rank's shard only, reading only its slices.
    """
    dtype, device = parse_dtype(dtype), parse_device(device)
    path = resolve(name_or_path)
    if path.is_file() and path.suffix == ".gguf":
        from tinyformers.loading.gguf_model import load_gguf_model

        return load_gguf_model(path, dtype, device, native_gguf, shard), path
    if native_gguf:
        raise CheckpointError(f"{path}: quantize gguf keeps a GGUF file's blocks: not a GGUF file")
    if not path.is_dir():
        raise CheckpointError(f"{path}: expected a checkpoint folder (config.json + weights)")
    config_path = path / "config.json"
    raw = read_json(config_path)
    try:
        arch = get_architecture(raw.get("model_type"))
        config = arch.Config.from_dict(raw)
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"{config_path}: {e}") from e
    if shard is None:
        weights = read_weights(path)
    else:  # views of the files' mappings: only this rank's slices will be read
        weights, drop_pages = map_weights(path)
    try:
        check_layer_count(config.layer_count, weights)
        # subtle: sanitize transposes and stacks tensors; one of a shape no config could have
        # (a 3-D Conv1D weight, q/k/v of unequal widths) fails there, before the shape check
        weights = arch.sanitize(weights, config)
    except (ValueError, RuntimeError) as e:
        raise CheckpointError(f"{path}: tensors do not fit the config: {e}") from e
    if shard is not None:
        config, weights = shard.local_config(config), shard.take_all(weights, drop_pages)
    return build(arch.Model, config, weights, dtype, device, source=path), path


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
