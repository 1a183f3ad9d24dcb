"""Read a Hugging Face checkpoint folder: config.json and its weights in any published layout.

Weights, in the order we look for them: sharded safetensors (model.safetensors.index.json),
model.safetensors, sharded pytorch_model.bin, pytorch_model.bin (zip or legacy pickle).
Pickles are read with `weights_only=True` only: a file that needs anything beyond tensors is
refused, never executed (CVE-2025-32434).
"""

from __future__ import annotations

import mmap
from collections.abc import Callable
from pathlib import Path

import torch

from tinyformers.errors import CheckpointError
from tinyformers.loading.json_file import read_json
from tinyformers.loading.safetensors import load_safetensors, map_safetensors
from tinyformers.loading.torch_pickle import load_torch_pickle

WEIGHT_FILES = (
    "model.safetensors.index.json",
    "model.safetensors",
    "pytorch_model.bin.index.json",
    "pytorch_model.bin",
)


def read_weights(folder: Path, read_file=None) -> dict[str, torch.Tensor]:
    """Every tensor of the checkpoint in `folder`, by the checkpoint's own names
    (`read_file(path)` reads each weights file; default: copied out whole)."""
    read_file = read_file or _read_file
    for name in WEIGHT_FILES:
        path = folder / name
        if path.is_file():
            if name.endswith(".index.json"):
                return _read_sharded(path, read_file)
            return read_file(path)
    raise CheckpointError(f"{folder}: no weights found (expected one of {', '.join(WEIGHT_FILES)})")


def map_weights(folder: Path) -> tuple[dict[str, torch.Tensor], Callable[[], None]]:
    """Like `read_weights`, but safetensors come back as views of the file mappings (nothing
    read yet), with a function that drops the pages read so far from this process's memory.

    For tensor parallel, which copies out one slice per tensor. Pickles are read whole (our
    safe unpickler copies every tensor), and for them the function does nothing.
    """
    maps: list[mmap.mmap] = []

    def read(path: Path) -> dict[str, torch.Tensor]:
        if path.suffix != ".safetensors":
            return load_torch_pickle(path)
        tensors, mapping = map_safetensors(path)
        maps.append(mapping)
        return tensors

    def drop_pages() -> None:
        if hasattr(mmap, "MADV_DONTNEED"):
            for mapping in maps:
                mapping.madvise(mmap.MADV_DONTNEED)

    return read_weights(folder, read), drop_pages


def _read_file(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        return load_safetensors(path)
    return load_torch_pickle(path)


def _read_sharded(index_path: Path, read_file) -> dict[str, torch.Tensor]:
    """Every shard the index names; a missing shard or tensor is an error, not random weights."""
    weight_map = read_json(index_path).get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f"{index_path}: no weight_map")
    tensors: dict[str, torch.Tensor] = {}
    for shard in weight_map.values():
        if not _plain_file_name(shard):
            raise CheckpointError(
                f"{index_path}: shard name {shard!r:.100} is not a file name in this folder"
            )
    for shard in dict.fromkeys(weight_map.values()):  # each once, in order
        shard_path = index_path.parent / shard
        if not shard_path.is_file():
            raise CheckpointError(f"{shard_path}: shard listed in {index_path.name} is missing")
        for name, tensor in read_file(shard_path).items():
            if weight_map.get(name) != shard:
                raise CheckpointError(f"{shard_path}: tensor {name} is not listed for this shard")
            tensors[name] = tensor
    if missing := [name for name in weight_map if name not in tensors]:
        raise CheckpointError(
            f"{index_path}: tensor {missing[0]} is listed but not in {weight_map[missing[0]]}"
        )
    return tensors


def _plain_file_name(name) -> bool:
    """A file name with no folder part: `../x`, `/etc/x` and `a/b` would read outside."""
    return (
        isinstance(name, str)
        and name not in ("", ".", "..")
        and "/" not in name
        and "\\" not in name
        and "\0" not in name
    )
