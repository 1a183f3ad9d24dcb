"""Read a Hugging Face checkpoint folder: config.json and its weights in any published layout.

Weights, in the order we look for them: sharded safetensors (model.safetensors.index.json),
model.safetensors, sharded pytorch_model.bin, pytorch_model.bin (zip or legacy pickle).
Pickles are read with `weights_only=True` only: a file that needs anything beyond tensors is
refused, never executed (CVE-2025-32434).
"""

from __future__ import annotations

import pickle
import zipfile
from pathlib import Path

import torch

from tinyformers.errors import CheckpointError
from tinyformers.loading.json_file import read_json
from tinyformers.loading.safetensors import load_safetensors

WEIGHT_FILES = (
    "model.safetensors.index.json",
    "model.safetensors",
    "pytorch_model.bin.index.json",
    "pytorch_model.bin",
)


def read_weights(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the checkpoint in `folder`, by the checkpoint's own names."""
    for name in WEIGHT_FILES:
        path = folder / name
        if path.is_file():
            return _read_sharded(path) if name.endswith(".index.json") else _read_file(path)
    raise CheckpointError(f"{folder}: no weights found (expected one of {', '.join(WEIGHT_FILES)})")


def _read_file(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        return load_safetensors(path)
    return load_torch_pickle(path)


def _read_sharded(index_path: Path) -> dict[str, torch.Tensor]:
    """Every shard the index names; a missing shard or tensor is an error, not random weights."""
    weight_map = read_json(index_path).get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f"{index_path}: no weight_map")
    tensors: dict[str, torch.Tensor] = {}
    for shard in dict.fromkeys(weight_map.values()):  # each once, in order
        shard_path = index_path.parent / shard
        if not shard_path.is_file():
            raise CheckpointError(f"{shard_path}: shard listed in {index_path.name} is missing")
        for name, tensor in _read_file(shard_path).items():
            if weight_map.get(name) != shard:
                raise CheckpointError(f"{shard_path}: tensor {name} is not listed for this shard")
            tensors[name] = tensor
    if missing := [name for name in weight_map if name not in tensors]:
        raise CheckpointError(
            f"{index_path}: tensor {missing[0]} is listed but not in {weight_map[missing[0]]}"
        )
    return tensors


def load_torch_pickle(path: Path) -> dict[str, torch.Tensor]:
    """A pytorch_model.bin, zip (memory-mapped) or legacy format, holding only tensors."""
    is_zip = zipfile.is_zipfile(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=is_zip)
    except pickle.UnpicklingError as e:
        # weights_only refused a global (a function, a class): the file wants to run code.
        reason = next((ln for ln in str(e).splitlines() if "GLOBAL" in ln), "not plain tensors")
        raise CheckpointError(
            f"{path}: refused: the pickle needs more than tensors ({reason.strip()})"
        ) from e
    except Exception as e:  # truncated zip, bad magic, EOF in the middle of a pickle ...
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint ({first})") from e
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path}: expected a dict of tensors")
    return state
