"""Architectures, one file each, found by the checkpoint's `model_type` (mlx-lm's registry).

Each module provides `Config.from_dict`, the model class (`Model`), `sanitize` that maps a
Hugging Face checkpoint's tensor names and layout onto the model's, and for GGUF files
`gguf_config`, `gguf_names` and `sanitize_gguf`.
"""

from __future__ import annotations

from dataclasses import MISSING, fields
from importlib import import_module
from types import ModuleType

ARCHITECTURES = {"gpt2": "gpt2", "llama": "llama", "mistral": "llama"}


def get_architecture(model_type: str) -> ModuleType:
    """The module implementing `model_type`; ValueError names the supported ones."""
    if model_type not in ARCHITECTURES:
        raise ValueError(
            f"model_type {model_type!r} is not supported (supported: {', '.join(ARCHITECTURES)})"
        )
    return import_module(f"tinyformers.models.{ARCHITECTURES[model_type]}")


def expand_gguf_names(
    names: dict[str, str], per_layer: dict[str, str], n_layer: int
) -> dict[str, str]:
    """GGUF tensor name -> ours: `names` as given, and each `per_layer` entry for every block,
    weight and bias: ("attn_norm", "h.{i}.ln_1") gives blk.0.attn_norm.weight -> h.0.ln_1.weight.
    """
    out = dict(names)
    for i in range(n_layer):
        for theirs, ours in per_layer.items():
            for kind in ("weight", "bias"):
                out[f"blk.{i}.{theirs}.{kind}"] = f"{ours.format(i=i)}.{kind}"
    return out


def config_fields(cls: type, d: dict) -> dict:
    """The entries of a checkpoint's config dict that are fields of the dataclass `cls`
    (unknown keys ignored, None taken as absent); ValueError names a missing required one."""
    for f in fields(cls):
        if f.default is MISSING and not isinstance(d.get(f.name), int):
            raise ValueError(f"field {f.name!r} is missing or not an integer")
    known = {f.name for f in fields(cls)}
    return {k: v for k, v in d.items() if k in known and v is not None}
