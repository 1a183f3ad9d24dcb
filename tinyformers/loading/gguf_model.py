"""A model from a GGUF file: config from its metadata, weights dequantized to the chosen dtype.

Every tensor name and shape is checked against the architecture before any weight is decoded,
so a file that does not fit fails at once, naming the tensor.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from tinyformers.errors import CheckpointError
from tinyformers.loading.gguf import read_gguf
from tinyformers.loading.loader import build
from tinyformers.models import get_architecture


def load_gguf_model(path: Path, dtype: torch.dtype, device: torch.device) -> nn.Module:
    with read_gguf(path) as gguf:
        architecture = gguf.metadata.get("general.architecture")
        try:
            arch = get_architecture(architecture)
            n_vocab = len(gguf.metadata.get("tokenizer.ggml.tokens", []))
            config = arch.gguf_config(gguf.metadata, n_vocab)
        except (ValueError, TypeError) as e:
            raise CheckpointError(f"{path}: {e}") from e
        config.tie_word_embeddings = "output.weight" not in gguf.tensors
        with torch.device("meta"):
            expected = dict(arch.Model(config).named_parameters())
        names = arch.gguf_names(config)
        for name, info in gguf.tensors.items():
            ours = names.get(name)
            if ours is None or ours not in expected:
                raise CheckpointError(f"{path}: unexpected tensor {name} for {architecture}")
            if info.shape != tuple(expected[ours].shape):
                raise CheckpointError(
                    f"{path}: tensor {name} has shape {info.shape}, "
                    f"expected {tuple(expected[ours].shape)} for this {architecture} config"
                )
        weights = {names[name]: gguf.tensor(name) for name in gguf.tensors}
        weights = arch.sanitize_gguf(weights, config)
        return build(arch.Model, config, weights, dtype, device, source=path)
