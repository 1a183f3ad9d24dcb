"""A model from a GGUF file: config from its metadata, weights dequantized to the chosen dtype;
and the file's own quantized blocks, for `quantize="gguf"` to run as stored.

Every tensor name and shape is checked against the architecture before any weight is decoded,
so a file that does not fit fails at once, naming the tensor.
"""

from __future__ import annotations

import sys
from collections import Counter
from functools import partial
from pathlib import Path

import torch
from torch import nn

from tinyformers.errors import CheckpointError
from tinyformers.loading.build import build, build_meta
from tinyformers.loading.ggml_quants import GGMLType, kquant_split, q4_split, q8_0_split
from tinyformers.loading.gguf import GGUFFile, read_gguf
from tinyformers.loading.gguf_arch import gguf_architecture, metadata_of
from tinyformers.models import check_layer_count, get_architecture


def load_gguf_model(path: Path, dtype: torch.dtype, device: torch.device, shard=None) -> nn.Module:
    """The model of a GGUF file, every matrix dequantized to `dtype`. `shard`: a
    `parallel.Shard`, this rank's shard only, dequantized from the blocks that hold its
    slices."""
    with read_gguf(path) as gguf:
        architecture = gguf.metadata.get("general.architecture")
        try:
            fmt = gguf_architecture(architecture)
            n_vocab = len(gguf.metadata.get("tokenizer.ggml.tokens", []))
            raw = fmt.config(metadata_of(gguf.metadata, architecture), n_vocab)
            arch = get_architecture(raw["model_type"])
            config = arch.Config.from_dict(raw)
            check_layer_count(config.layer_count, gguf.tensors)
        except (ValueError, TypeError) as e:
            raise CheckpointError(f"{path}: {e}") from e
        config.tie_word_embeddings = "output.weight" not in gguf.tensors
        expected = dict(build_meta(arch.Model, config, path).named_parameters())
        names = fmt.names(config)
        for name, info in gguf.tensors.items():
            ours = names.get(name)
            if ours is None:
                raise CheckpointError(f"{path}: unexpected tensor {name} for {architecture}")
            if ours in expected and info.shape != tuple(expected[ours].shape):
                raise CheckpointError(
                    f"{path}: tensor {name} has shape {info.shape}, "
                    f"expected {tuple(expected[ours].shape)} for this {architecture} config"
                )
        # The layout fixes (row permutations, stacked matrices) rehearsed on shapes alone.
        layout = {names[n]: torch.empty(i.shape, device="meta") for n, i in gguf.tensors.items()}
        try:
            layout = fmt.sanitize(layout, config)
        except (RuntimeError, ValueError) as e:
            raise CheckpointError(
                f"{path}: tensors do not fit this {architecture} config: {e}"
            ) from e
        for ours, t in layout.items():
            if ours not in expected or t.shape != expected[ours].shape:
                raise CheckpointError(
                    f"{path}: {ours} of shape {tuple(t.shape)} does not fit this "
                    f"{architecture} config"
                )
        if shard is None:
            weights = {names[name]: gguf.tensor(name) for name in gguf.tensors}
        else:  # whole heads: llama.cpp's q/k row order is undone within each, on local heads
            config = shard.local_config(config)
            weights = {
                names[n]: shard.take(names[n], info.shape, partial(gguf.tensor_part, n))
                for n, info in gguf.tensors.items()
            }
        weights = fmt.sanitize(weights, config)
        return build(arch.Model, config, weights, dtype, device, source=path)


def native_blocks(path: Path, config, shard=None) -> dict[str, tuple]:
    """The file's quantized matrices in their blocks, by module name, as (ggml type name,
    values, scales[, mins]), for `quantize="gguf"` to compute on as stored (as llama.cpp
    does); one line on stderr names the block kinds that run dense. `config`: the loaded
    model's (this rank's, under `shard`)."""
    with read_gguf(path) as gguf:
        architecture = gguf.metadata.get("general.architecture")
        fmt = gguf_architecture(architecture)
        blocks = _native_blocks(gguf, fmt, config, fmt.names(config), shard)
        if dense := _dense_kinds(gguf):
            print(
                f"tinyformers: {path.name}: {dense} matrices run dense "
                f"(our kernels run {', '.join(t.name for t in NATIVE)})",
                file=sys.stderr,
            )
    return blocks


# the block kinds our kernels compute on, and how each is split into values, scales[, mins]
NATIVE = {
    GGMLType.Q8_0: lambda raw, ggml_type, shape: q8_0_split(raw, shape),
    GGMLType.Q4_0: q4_split,
    GGMLType.Q4_1: q4_split,
    GGMLType.Q5_0: kquant_split,
    GGMLType.Q5_1: kquant_split,
    GGMLType.Q4_K: kquant_split,
    GGMLType.Q5_K: kquant_split,
    GGMLType.Q6_K: kquant_split,
}


def _dense_kinds(gguf: GGUFFile) -> str:
    """The quantized matrices that `quantize="gguf"` dequantizes, counted by block kind, most
    first ("81 Q5_0, 27 Q4_K, 9 Q6_K"); "" when every one runs on its own blocks."""
    plain = (GGMLType.F32, GGMLType.F16, GGMLType.BF16)  # no blocks: dense is what they are
    kinds = Counter(
        GGMLType(info.ggml_type).name
        for info in gguf.tensors.values()
        if len(info.shape) == 2 and info.ggml_type not in (*NATIVE, *plain)
    )
    return ", ".join(f"{n} {kind}" for kind, n in kinds.most_common())


def _native_blocks(gguf: GGUFFile, fmt, config, names: dict[str, str], shard=None) -> dict:
    """The file's NATIVE matrices as `pack_quantized` takes them (ggml type name, values,
    scales and, for some, mins), by the name of the module they belong to; the layout fixes of
    `fmt.sanitize` (row permutations) are applied to each part of the blocks alike. `shard`:
    only this rank's rows, or whole blocks of its columns (`Shard.take_blocks`)."""
    parts: dict[str, tuple[torch.Tensor, ...]] = {}
    types: dict[str, str] = {}
    for name, info in gguf.tensors.items():
        split = NATIVE.get(info.ggml_type)
        if len(info.shape) != 2 or split is None:
            continue
        ours = names[name]
        parts[ours] = split(gguf.raw(name), info.ggml_type, info.shape)
        types[ours] = GGMLType(info.ggml_type).name
        if shard is not None:
            parts[ours] = shard.take_blocks(ours, name, parts[ours])
    by_part = [
        fmt.sanitize({k: v[i] for k, v in parts.items() if len(v) > i}, config)
        for i in range(3)  # values, scales, mins (Q8_0, Q5_0, Q6_K have no mins)
    ]
    return {
        name.removesuffix(".weight"): (types[name], *(p[name] for p in by_part if name in p))
        for name in by_part[0]
    }
