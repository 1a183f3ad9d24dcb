"""The training loop, in the order nanoGPT's train.py runs it: data, model, optimizer, then
for each step: evaluate now and then, set the learning rate, forward, loss, backward (over
several micro-batches when accumulating), clip, step.

Every step is one turn of the same four lines (loss.py, optim.py):

    logits = net(x)                       # what the model predicts for each next token
    loss = cross_entropy(logits, y)       # how surprised it is by the real ones
    loss.backward()                       # d loss / d w for every weight w (autograd)
    optimizer.step()                      # w <- w - lr * AdamW's direction

The first two run as one, `linear_cross_entropy(net(x), head, y)`: the same numbers without
the (B, T, V) tensor of logits (chunked_loss.py).

Under torchrun each process runs this loop on its share of each step's micro-batches, and
DistributedDataParallel averages the gradients across them before the step.
"""

from __future__ import annotations

import math
import os
import signal
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from tinyformers.errors import TinyformersError
from tinyformers.training import checkpoint as ckpt
from tinyformers.training.chunked_loss import linear_cross_entropy
from tinyformers.training.data import Dataset, load_dataset, read_text_file
from tinyformers.training.model import TrainedModel, build_model, write_model
from tinyformers.training.optim import AdamW, clip_grad_norm, learning_rate, parameter_groups
from tinyformers.training.settings import TrainSettings


@dataclass
class Progress:
    """What the loop knows about itself between steps (saved in the checkpoint's state)."""

    iter: int = 0
    elapsed_s: float = 0.0  # training time before this process, when resumed
    tokens: int = 0  # tokens trained on, every rank together
    last_good: int | None = None  # the iter of the last checkpoint written
    matmuls: dict = field(default_factory=dict)  # the matmul kernel per weight shape


class Stop(TinyformersError):
    """The run stopped early (NaN loss, Ctrl-C); the message says why and what was kept."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def train(settings: TrainSettings, resume: bool = False, log=print) -> Path:
    """Train as `settings` say; the out dir on success. Raises Stop on NaN or Ctrl-C after
    saving what can be saved, TinyformersError on bad input before anything is written."""
    previous = signal.getsignal(signal.SIGINT)
    try:
        return _train(settings, resume, log)
    finally:
        signal.signal(signal.SIGINT, previous)
        if dist.is_initialized():
            dist.destroy_process_group()


def _train(settings: TrainSettings, resume: bool, log) -> Path:
    rank, world, device = _start_distributed(settings.device)
    out = Path(settings.out)
    torch.manual_seed(settings.seed + rank)  # dropout differs per rank; batches do not
    text = read_text_file(Path(settings.data))
    if rank == 0:
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise TinyformersError(f"{out}: cannot make the out dir ({e.strerror})") from None
    saved = ckpt.load_checkpoint(out) if resume else None
    model = build_model(settings, text, device, saved[2]["matmuls"] if saved else None)
    data = load_dataset(Path(settings.data), text, model.tokenizer, settings.block_size)
    net = model.net
    groups = parameter_groups(net, settings.weight_decay)
    optimizer = AdamW(groups, settings.learning_rate, (settings.beta1, settings.beta2))
    batches = torch.Generator().manual_seed(settings.seed)  # the same stream on every rank
    progress = Progress(matmuls=model.matmuls)
    if saved is not None:
        progress = _resume(out, saved, model, optimizer, batches)
    accumulation = _per_rank_steps(settings.gradient_accumulation_steps, world)
    trained = (
        nn.parallel.DistributedDataParallel(
            net, device_ids=[device] if device.type == "cuda" else None
        )
        if world > 1
        else net
    )
    autocast = (
        torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()
    )
    tokens_per_iter = (
        settings.batch_size * settings.block_size * settings.gradient_accumulation_steps
    )
    decay_iters = settings.lr_decay_iters or settings.max_iters

    def lr_at(it: int) -> float:
        s = settings
        return learning_rate(it, s.learning_rate, s.min_lr, s.warmup_iters, decay_iters)

    interrupted = _catch_interrupt()
    live = _LiveLine(settings.max_iters, tokens_per_iter, enabled=rank == 0 and sys.stderr.isatty())
    if rank == 0:
        log(_summary(model, data, settings, world))
    start = time.perf_counter() - progress.elapsed_s
    window_start, window_tokens = time.perf_counter(), 0
    first = progress.iter
    norms: dict = {}  # the gradient's length, over all and per layer, before an evaluation
    while True:
        it = progress.iter
        at_end = it >= settings.max_iters
        if (it % settings.eval_interval == 0 or at_end) and (it != first or not resume):
            if rank == 0:
                live.clear()
                rate = window_tokens / max(time.perf_counter() - window_start, 1e-9)
                record = _evaluate(model, data, settings, device, autocast)
                record.update(
                    iter=it,
                    lr=lr_at(it),
                    elapsed_s=round(time.perf_counter() - start, 3),
                    tokens_per_s=round(rate, 1) if window_tokens else None,
                    **norms,
                )
                log(
                    f"iter {it}: train loss {record['train_loss']:.4f}, "
                    f"val loss {record['val_loss']:.4f}"
                    + (f", {rate:,.0f} tok/s" if window_tokens else "")
                )
                progress.elapsed_s = time.perf_counter() - start
                _save(out, model, optimizer, batches, progress, record)
            window_start, window_tokens = time.perf_counter(), 0
        if at_end:
            break
        optimizer.lr = lr_at(it)
        loss_sum = torch.zeros((), device=device)
        for micro, (x, y) in enumerate(_micro_batches(data, settings, rank, world, batches)):
            x, y = x.to(device), y.to(device)
            last = micro == accumulation - 1
            sync = trained.no_sync() if world > 1 and not last else nullcontext()
            with sync, autocast:
                loss = linear_cross_entropy(trained(x), model.head, y) / accumulation
            with sync:
                loss.backward()
            loss_sum += loss.detach()
        if world > 1:  # every rank logs (and checks) the mean over all of them
            dist.all_reduce(loss_sum)
            loss_sum /= world
        if (it + 1) % settings.eval_interval == 0 or it + 1 == settings.max_iters:
            norms = _grad_norms(net)  # for the evaluation after this step
        norm = clip_grad_norm(optimizer, settings.grad_clip)
        if not (math.isfinite(loss_sum.item()) and math.isfinite(norm.item())):
            kept = (
                f"the last good checkpoint (iter {progress.last_good}) is kept in {out}"
                if progress.last_good is not None
                else "no checkpoint was written yet"
            )
            raise Stop(
                f"the loss became {loss_sum.item()} at iter {it} (gradient norm {norm.item()}); "
                f"stopped, {kept}; try a smaller --learning-rate",
                exit_code=1,
            )
        optimizer.step()
        optimizer.zero_grad()
        progress.iter += 1
        progress.tokens += tokens_per_iter
        window_tokens += tokens_per_iter
        live.show(progress.iter, loss_sum.item(), window_tokens, time.perf_counter() - window_start)
        if _interrupt_seen(interrupted, world):
            live.clear()
            if rank == 0:
                progress.elapsed_s = time.perf_counter() - start
                _save(out, model, optimizer, batches, progress, None)
            raise Stop(
                f"interrupted at iter {progress.iter}: checkpoint saved in {out}; continue "
                "with the same command and --resume",
                exit_code=130,
            )
    live.clear()
    return out


def _start_distributed(device_name: str) -> tuple[int, int, torch.device]:
    """(rank, world size, device): one process, or one of torchrun's (gloo on the CPU, NCCL
    on CUDA, each process on its own GPU)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    device = torch.device(device_name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise TinyformersError(f"--device {device_name}: CUDA is not available on this machine")
    if world == 1:
        return 0, 1, device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank(), world, device


def _per_rank_steps(accumulation: int, world: int) -> int:
    if accumulation % world:
        raise TinyformersError(
            f"--gradient-accumulation-steps {accumulation} is not a multiple of the {world} "
            "processes (each takes an equal share of every step's micro-batches)"
        )
    return accumulation // world


def _micro_batches(data: Dataset, settings: TrainSettings, rank: int, world: int, generator):
    """This rank's micro-batches of one step. Every rank draws all of the step's batches
    from the same generator and keeps every world-th one, so N processes train on exactly
    the batches one process accumulating N times as many would."""
    for micro in range(settings.gradient_accumulation_steps):
        x, y = data.train.batch(settings.batch_size, settings.block_size, generator)
        if micro % world == rank:
            yield x, y


@torch.no_grad()
def _evaluate(model: TrainedModel, data: Dataset, settings, device, autocast) -> dict:
    """Mean loss over eval_iters batches of each split, the same batches at every evaluation
    (their own generator), so two evaluations differ only by what the model learnt."""
    net = model.net
    net.eval()
    losses = {}
    for name, split in (("train", data.train), ("val", data.val)):
        generator = torch.Generator().manual_seed(settings.seed + 1)
        total = 0.0
        for _ in range(settings.eval_iters):
            x, y = split.batch(settings.batch_size, settings.block_size, generator)
            with autocast:
                total += linear_cross_entropy(net(x.to(device)), model.head, y.to(device)).item()
        losses[f"{name}_loss"] = round(total / settings.eval_iters, 6)
    net.train()
    return losses


def _grad_norms(net: nn.Module) -> dict:
    """The gradient's length over every weight and per layer, before clipping (a layer: the
    tensors of one block, `h.3` or `layers.3`, or else of one first name part, `wte`)."""
    squares: dict[str, float] = {}
    for name, p in net.named_parameters():
        if p.requires_grad:
            parts = name.split(".")
            layer = ".".join(parts[:2]) if len(parts) > 2 and parts[1].isdigit() else parts[0]
            squares[layer] = squares.get(layer, 0.0) + p.grad.float().pow(2).sum().item()
    return {
        "grad_norm": round(math.sqrt(sum(squares.values())), 6),
        "grad_norm_by_layer": {k: round(math.sqrt(v), 6) for k, v in squares.items()},
    }


def _save(out: Path, model: TrainedModel, optimizer: AdamW, batches, progress, record) -> None:
    """Metrics line, the model as an HF folder, the curves, then the resumable checkpoint;
    a failed write (a full disk) stops the run, every earlier file still whole."""
    try:
        _write_all(out, model, optimizer, batches, progress, record)
    except (OSError, TinyformersError) as e:
        kept = (
            f"the checkpoint of iter {progress.last_good} is kept"
            if progress.last_good is not None
            else "no checkpoint was written before"
        )
        raise Stop(f"could not save at iter {progress.iter}: {e}; {kept}", 1) from e


def _write_all(out: Path, model: TrainedModel, optimizer: AdamW, batches, progress, record):
    if record is not None:
        ckpt.append_metrics(out, record)
    write_model(model, out)
    if record is not None:
        ckpt.plot_losses(out)
    state = {
        "iter": progress.iter,
        "elapsed_s": progress.elapsed_s,
        "tokens": progress.tokens,
        "matmuls": progress.matmuls,
        "settings": model.settings.to_dict(),
    }
    weights = {name: p for name, p in model.net.named_parameters() if p.requires_grad}
    tensors = {**optimizer.state_dict(), **ckpt.rng_tensors(batches)}
    ckpt.save_checkpoint(out, weights, tensors, state)
    progress.last_good = progress.iter


def _resume(out: Path, saved, model: TrainedModel, optimizer: AdamW, batches) -> Progress:
    weights, tensors, state = saved
    params = {name: p for name, p in model.net.named_parameters() if p.requires_grad}
    if weights.keys() != params.keys():
        raise TinyformersError(f"{out}: the checkpoint's weights do not fit the model")
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(weights[name])
    optimizer.load_state_dict(tensors)
    ckpt.restore_rng(tensors, batches)
    ckpt.keep_metrics_until(out, state["iter"])
    return Progress(
        iter=state["iter"],
        elapsed_s=state["elapsed_s"],
        tokens=state["tokens"],
        last_good=state["iter"],
        matmuls=model.matmuls,
    )


def _catch_interrupt() -> list[bool]:
    """A flag that Ctrl-C sets; the loop finishes its step, saves, then stops."""
    seen = [False]

    def handler(signum, frame) -> None:
        if seen[0]:  # a second Ctrl-C: stop now
            raise KeyboardInterrupt
        seen[0] = True

    signal.signal(signal.SIGINT, handler)
    return seen


def _interrupt_seen(seen: list[bool], world: int) -> bool:
    if world == 1:
        return seen[0]
    flag = torch.tensor([float(seen[0])])  # every rank stops at the same step
    dist.all_reduce(flag)
    return bool(flag.item())


def _summary(model: TrainedModel, data: Dataset, settings: TrainSettings, world: int) -> str:
    trainable = sum(p.numel() for p in model.net.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.net.parameters())
    what = f"{type(model.net).__name__}, {total / 1e6:.2f}M parameters"
    if trainable != total:
        what += f", {trainable / 1e6:.2f}M of them trained (LoRA rank {settings.lora})"
    ranks = f" on {world} processes" if world > 1 else ""
    return (
        f"training {what}{ranks}: {len(data.train.ids):,} train and {len(data.val.ids):,} val "
        f"tokens, vocabulary {model.tokenizer.vocab_size:,}"
    )


class _LiveLine:
    """One line on a terminal, rewritten each step: iter, loss, tok/s, time left."""

    def __init__(self, total: int, tokens_per_iter: int, enabled: bool) -> None:
        self.total, self.tokens_per_iter, self.enabled = total, tokens_per_iter, enabled
        self.shown = False

    def show(self, it: int, loss: float, tokens: int, seconds: float) -> None:
        if not self.enabled:
            return
        rate = tokens / max(seconds, 1e-9)  # since the last evaluation
        left = (self.total - it) * self.tokens_per_iter / max(rate, 1e-9)
        line = (
            f"iter {it}/{self.total}  loss {loss:.4f}  {rate:,.0f} tok/s  "
            f"ETA {int(left // 60)}m{int(left % 60):02d}s"
        )
        sys.stderr.write(f"\r{line}\x1b[K")
        sys.stderr.flush()
        self.shown = True

    def clear(self) -> None:
        if self.shown:
            sys.stderr.write("\r\x1b[K")
            sys.stderr.flush()
            self.shown = False
