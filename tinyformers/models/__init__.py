"""Architectures, one file each, found by the checkpoint's `model_type` (mlx-lm's registry).

Each module provides `Config.from_dict`, the model class (`Model`), `sanitize` that maps a
Hugging Face checkpoint's tensor names and layout onto the model's, and for GGUF files
`gguf_config`, `gguf_names` and `sanitize_gguf`.
"""

from __future__ import annotations

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
