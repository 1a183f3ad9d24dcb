"""A loaded model -> a Hugging Face checkpoint folder that transformers'
`AutoModelForCausalLM.from_pretrained` and our own `load` both read.

Each architecture file says how, beside the `sanitize` that it undoes: `to_hf` (our tensor
names and layout -> HF's) and `hf_config` (the config.json). This file writes the folder,
every file through `atomic_path`, so a failed save (a full disk) leaves the old file whole.
Tokenizer files are written by `tokenizers/save.py`, not here.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import Tensor, nn

from tinyformers.errors import TinyformersError
from tinyformers.loading.atomic import write_atomic
from tinyformers.loading.build import build_meta
from tinyformers.loading.safetensors import save_safetensors
from tinyformers.models import architecture_of


def save_pretrained(
    net: nn.Module,
    folder: Path,
    dtype: torch.dtype | None = None,
    state: dict[str, Tensor] | None = None,
) -> None:
    """Write `net` into `folder` (made if missing): config.json, generation_config.json and
    model.safetensors, tied weights once. dtype: the tensors' dtype in the file (default:
    the model's own; float32 keeps every logit, bfloat16 halves the file). state: the tensors
    to write under the plain model's names, in place of `net.state_dict()` (a model in
    training passes its LoRA adapters merged into their weights this way).

    Example:
        save_pretrained(tinyformers.load("smollm2", fast=False).net, Path("smollm2-hf"))
    """
    folder = Path(folder)
    arch = architecture_of(net)  # models/<architecture>.py
    state = net.state_dict() if state is None else state
    _check_unpacked(net, state, folder)
    hf = arch.to_hf(state, net.config)
    tensors = {
        name: w.detach().to(dtype or w.dtype) for name, w in hf.items()
    }  # no copy unless asked
    config = arch.hf_config(net.config)
    config["torch_dtype"] = str(next(iter(tensors.values())).dtype).removeprefix("torch.")
    ids = {k: config[k] for k in ("bos_token_id", "eos_token_id") if config.get(k) is not None}
    try:
        folder.mkdir(parents=True, exist_ok=True)
        # format "pt": transformers 4.x refuses a file without it
        save_safetensors(folder / "model.safetensors", tensors, metadata={"format": "pt"})
        write_atomic(folder / "config.json", json.dumps(config, indent=2) + "\n")
        write_atomic(folder / "generation_config.json", json.dumps(ids, indent=2) + "\n")
    except OSError as e:  # a full disk, no permission: the old files stay
        raise TinyformersError(f"{folder}: could not save the model: {e}") from e


def _check_unpacked(net: nn.Module, state: dict[str, Tensor], folder: Path) -> None:
    """TinyformersError unless `state` holds its architecture's own tensors: `load(fast=True)`
    packs the matrices for our CPU kernels (q, k, v stacked, a blocked layout, maybe int8 or
    GGUF blocks), and those are not unpacked here."""
    expected = build_meta(type(net), net.config, folder).state_dict().keys()
    if state.keys() != expected:
        raise TinyformersError(
            f"{folder}: this model's matrices are packed for the CPU kernels: "
            "load it with fast=False to save it"
        )
