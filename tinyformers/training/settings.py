"""What a training run is told: every setting, named as nanoGPT's config keys, with defaults.

A run from scratch defaults to nanoGPT's shakespeare_char recipe for a CPU (its README:
`--device=cpu --compile=False --eval_iters=20 --log_interval=1 --block_size=64
--batch_size=12 --n_layer=4 --n_head=4 --n_embd=128 --max_iters=2000 --lr_decay_iters=2000
--dropout=0.0` on top of config/train_shakespeare_char.py). A fine-tune (`model` set) defaults
to settings that suit a pretrained model on a CPU: a smaller learning rate (Hugging Face
Trainer's 5e-5 for every weight, 2e-4 for LoRA's), longer blocks, fewer steps.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

from tinyformers.errors import TinyformersError

# Settings that fix the model or its data: a resumed run keeps the ones it started with.
SHAPE = (
    "tokenizer",
    "arch",
    "model",
    "n_layer",
    "n_head",
    "n_embd",
    "block_size",
    "lora",
    "lora_alpha",
    "lora_targets",
    "lora_dropout",
    "dtype",
)


@dataclass
class TrainSettings:
    data: str
    out: str
    tokenizer: str | None = None  # "char", or any name load_tokenizer takes; None: the model's
    arch: str = "gpt2"  # from scratch: "gpt2" or "llama"
    model: str | None = None  # fine-tune this (anything `load` takes) instead of from scratch
    lora: int | None = None  # LoRA rank; None: every weight trains
    lora_alpha: float | None = None  # None: 2 * rank
    lora_targets: tuple[str, ...] | None = None  # None: attention and MLP projections
    lora_dropout: float = 0.0
    merge: bool = False  # LoRA: write merged weights instead of the adapter
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    block_size: int = 64
    batch_size: int = 12
    max_iters: int = 2000
    learning_rate: float = 1e-3
    min_lr: float = 1e-4
    lr_decay_iters: int | None = None  # None: max_iters
    warmup_iters: int = 100
    beta1: float = 0.9
    beta2: float = 0.99
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    dropout: float | None = None  # None: 0 from scratch, the checkpoint's own when fine-tuning
    eval_interval: int = 250
    eval_iters: int = 20
    gradient_accumulation_steps: int = 1
    seed: int = 1337
    device: str = "cpu"
    dtype: str | None = None  # fine-tune: the weights' dtype (float32 unless asked)
    threads: int | None = None
    sample_tokens: int = 200  # tokens of the sample printed at the end (0: none)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["lora_targets"] = list(self.lora_targets) if self.lora_targets else None
        return d


FINE_TUNE = {  # defaults that differ when a pretrained model is fine-tuned
    "block_size": 256,
    "batch_size": 4,
    "max_iters": 200,
    "learning_rate": 5e-5,
    "min_lr": 5e-6,
    "warmup_iters": 10,
    "beta2": 0.999,
    "weight_decay": 0.0,
    "eval_interval": 50,
    "eval_iters": 10,
}
LORA = {"learning_rate": 2e-4, "min_lr": 2e-5}  # on top of FINE_TUNE


def resolve(given: dict, saved: dict | None = None) -> TrainSettings:
    """The settings of a run: the defaults, then what a resumed checkpoint was run with, then
    what was `given` (None values: not given). A resumed run keeps its SHAPE settings:
    giving another value for one of them is an error."""
    known = {f.name for f in fields(TrainSettings)}
    given = {k: v for k, v in given.items() if k in known and v is not None}
    if saved is not None:
        for key in SHAPE:
            ours, theirs = given.get(key), saved.get(key)
            if key == "lora_targets" and ours is not None:
                ours = list(ours)
            if ours is not None and ours != theirs:
                raise TinyformersError(
                    f"--{key.replace('_', '-')} {ours}: the run being resumed used "
                    f"{theirs}; a resumed run keeps it"
                )
        given = {**{k: v for k, v in saved.items() if k in known}, **given}
    defaults: dict = {}
    if given.get("model") is not None:
        defaults.update(FINE_TUNE)
        if given.get("lora") is not None:
            defaults.update(LORA)
    settings = TrainSettings(**{**defaults, **given})
    if settings.lora_targets is not None:
        settings.lora_targets = tuple(settings.lora_targets)
    return settings
