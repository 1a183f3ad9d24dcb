"""Checkpoint -> model, one way: config -> architecture class -> weights -> sanitize -> build.

A folder's config.json and tensors are read here, a GGUF file's in gguf_model.py; both end in
build.py's `build` (the meta device, then the weights assigned, strictly). Making the model
fast is not loading's business: `tinyformers.load` hands the built model to
`kernels.prepare` afterwards.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from tinyformers.errors import CheckpointError
from tinyformers.loading.build import build
from tinyformers.loading.checkpoint import map_weights, read_weights
from tinyformers.loading.gguf_model import load_gguf_model
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
    shard=None,
) -> tuple[nn.Module, Path]:
    """The model of a checkpoint folder, a .gguf file (or a name), and the path it came from.

    shard: a `parallel.Shard`: build this rank's shard only, reading only its slices.
    """
    dtype, device = parse_dtype(dtype), parse_device(device)
    path = resolve(name_or_path)
    if is_gguf(path):
        return load_gguf_model(path, dtype, device, shard), path
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


def is_gguf(path: Path) -> bool:
    return path.is_file() and path.suffix == ".gguf"
