"""A training run's files in its out dir, written so that nothing is ever half-saved.

    DIR/config.json, model.safetensors, tokenizer.json ...   the model, as a Hugging Face folder
    DIR/adapter_config.json, adapter_model.safetensors     (LoRA: the adapter, in PEFT's format)
    DIR/metrics.jsonl, loss.png                             one line per evaluation; the curves
    DIR/checkpoint/                                         what --resume continues from

The checkpoint folder holds the trainable weights, AdamW's state, the step, the random
generators and the settings. It is written whole under a temporary name, then swapped in by
two renames; a crash (or a full disk) between them leaves `checkpoint.old`, which `load`
takes, so a previous checkpoint always survives a failed save. Everything is safetensors and
JSON: loading a checkpoint never runs code from it.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from torch import Tensor

from tinyformers.errors import CheckpointError
from tinyformers.loading.atomic import atomic_path, write_atomic
from tinyformers.loading.json_file import read_json
from tinyformers.loading.safetensors import load_safetensors, save_safetensors

CHECKPOINT = "checkpoint"
METRICS = "metrics.jsonl"
PLOT = "loss.png"


def save_checkpoint(
    out: Path, weights: dict[str, Tensor], optimizer: dict[str, Tensor], state: dict
) -> None:
    """Write out/checkpoint/ whole, or leave the previous one in place."""
    tmp, final, old = out / f"{CHECKPOINT}.tmp", out / CHECKPOINT, out / f"{CHECKPOINT}.old"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        _save_tensors(tmp / "weights.safetensors", weights)
        _save_tensors(tmp / "optimizer.safetensors", optimizer)
        write_atomic(tmp / "state.json", json.dumps(state, indent=2) + "\n")
        _fsync_dir(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
    os.replace(tmp, final)
    _fsync_dir(out)
    shutil.rmtree(old, ignore_errors=True)


def load_checkpoint(out: Path) -> tuple[dict[str, Tensor], dict[str, Tensor], dict]:
    """(weights, optimizer state, state) of the last checkpoint saved in `out`."""
    folder = out / CHECKPOINT
    if not folder.is_dir() and (out / f"{CHECKPOINT}.old").is_dir():
        folder = out / f"{CHECKPOINT}.old"  # a save stopped between its two renames
    if not folder.is_dir():
        raise CheckpointError(f"{out}: no checkpoint to resume from (no {CHECKPOINT}/ folder)")
    state = read_json(folder / "state.json")
    return (
        load_safetensors(folder / "weights.safetensors"),
        load_safetensors(folder / "optimizer.safetensors"),
        state,
    )


def _save_tensors(path: Path, tensors: dict[str, Tensor]) -> None:
    save_safetensors(path, tensors)  # the weights are views of one block: written as they are


def _fsync_dir(folder: Path) -> None:
    """Make the renames inside `folder` durable (a rename is an update of the folder)."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def rng_tensors(data_generator: torch.Generator) -> dict[str, Tensor]:
    """The random generators' states as tensors, for the optimizer file: the one that draws
    batches, and torch's own (dropout), so a resumed run draws what the first would have."""
    states = {"rng.data": data_generator.get_state(), "rng.torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["rng.cuda"] = torch.cuda.get_rng_state()
    return states


def restore_rng(tensors: dict[str, Tensor], data_generator: torch.Generator) -> None:
    data_generator.set_state(tensors["rng.data"])
    torch.set_rng_state(tensors["rng.torch"])
    if "rng.cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["rng.cuda"])


def append_metrics(out: Path, record: dict) -> None:
    with open(out / METRICS, "a") as f:
        f.write(json.dumps(record) + "\n")


def read_metrics(out: Path) -> list[dict]:
    path = out / METRICS
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def keep_metrics_until(out: Path, last_iter: int) -> None:
    """Drop the lines a run logged after the checkpoint it is resumed from."""
    kept = [r for r in read_metrics(out) if r["iter"] <= last_iter]
    write_atomic(out / METRICS, "".join(json.dumps(r) + "\n" for r in kept))


def plot_losses(out: Path) -> None:
    """loss.png: train and val loss against the step, from metrics.jsonl."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no window
    import matplotlib.pyplot as plt

    records = read_metrics(out)
    steps = [r["iter"] for r in records]
    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    ax.plot(steps, [r["train_loss"] for r in records], marker=".", label="train")
    ax.plot(steps, [r["val_loss"] for r in records], marker=".", label="val")
    ax.set_xlabel("iteration")
    ax.set_ylabel("loss (cross-entropy, nats per token)")
    ax.set_title(f"{out.name}: loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    with atomic_path(out / PLOT) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
