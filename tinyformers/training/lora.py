"""LoRA (Hu et al., 2021): fine-tune a few small matrices beside each frozen weight.

A linear layer computes W x. Fine-tuning changes W by some ΔW; LoRA writes that change as
a product B A of two thin matrices, A [r, in] and B [out, r], with r (the rank) small, so
y = W x + (alpha / r) B A x trains r * (in + out) numbers instead of in * out. B starts at 0,
so training starts from the model as it was. Afterwards B A can be added into W (merged) or
kept apart as an adapter, in PEFT's file format, which PEFT and `load(adapter=...)` read.
"""

from __future__ import annotations

import json
import math
from importlib import import_module
from pathlib import Path
from types import ModuleType

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tinyformers.errors import CheckpointError
from tinyformers.loading.atomic import write_atomic
from tinyformers.loading.json_file import read_json
from tinyformers.loading.safetensors import load_safetensors, save_safetensors

# The projections of attention and MLP, by architecture: LoRA's usual targets (PEFT names
# the same modules for these models).
DEFAULT_TARGETS = {
    "GPT2": ("c_attn", "c_proj", "c_fc"),
    "Llama": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
    "Gemma3": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
}
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


class LoRALinear(nn.Module):
    """`base(x) + (alpha / r) · B (A x)`, base frozen; A and B are what trains."""

    def __init__(self, base: nn.Linear, r: int, alpha: float, dropout: float = 0.0) -> None:
        super().__init__()
        self.base = base.requires_grad_(False)
        like = {"device": base.weight.device, "dtype": base.weight.dtype}
        self.lora_A = nn.Parameter(torch.empty(r, base.in_features, **like))  # (r, in)
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, r, **like))  # (out, r)
        # PEFT's initialisation for A (kaiming-uniform, as nn.Linear's own), so adapters start
        # from the same distribution; B = 0 makes the update 0 at step 0.
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.scaling = alpha / r
        self.dropout = dropout

    def forward(self, x: Tensor) -> Tensor:
        h = F.dropout(x, self.dropout, self.training) if self.dropout else x
        # (alpha / r) multiplies the small B, not the (.., out) update: the same product
        update = F.linear(
            F.linear(h, self.lora_A), self.lora_B * self.scaling
        )  # (.., r), (.., out)
        return self.base(x) + update

    def delta(self) -> Tensor:
        """ΔW = (alpha / r) B A, [out, in]: what merging adds to the base weight."""
        return (self.lora_B @ self.lora_A) * self.scaling


def add_lora(
    net: nn.Module, r: int, alpha: float, targets: tuple[str, ...], dropout: float = 0.0
) -> list[str]:
    """Freeze `net` and put a LoRALinear around each nn.Linear whose name ends in a target
    (`c_proj` matches attn.c_proj and mlp.c_proj, as PEFT matches). Returns their names."""
    net.requires_grad_(False)
    names = [
        name
        for name, module in net.named_modules()
        if isinstance(module, nn.Linear) and name.rsplit(".", 1)[-1] in targets
    ]
    if not names:
        raise ValueError(f"no linear layer is named {', '.join(targets)} in {type(net).__name__}")
    for name in names:
        owner, _, attr = name.rpartition(".")
        parent = net.get_submodule(owner)
        setattr(parent, attr, LoRALinear(getattr(parent, attr), r, alpha, dropout))
    return names


def lora_modules(net: nn.Module) -> dict[str, LoRALinear]:
    return {name: m for name, m in net.named_modules() if isinstance(m, LoRALinear)}


@torch.no_grad()
def merge_lora(net: nn.Module) -> None:
    """Add each adapter's B A into its base weight and put the plain layer back."""
    for name, module in lora_modules(net).items():
        module.base.weight += module.delta().to(module.base.weight.dtype)
        owner, _, attr = name.rpartition(".")
        setattr(net.get_submodule(owner), attr, module.base)


# -- PEFT's adapter files ----------------------------------------------------------------------


def _hf_module(arch: ModuleType, config, ours: str) -> str:
    """The HF checkpoint's name of our module `ours` (its weight's name, less `.weight`)."""
    (hf_name,) = arch.to_hf({f"{ours}.weight": torch.empty(1, 1, device="meta")}, config)
    return hf_name.removesuffix(".weight")


def _our_module(arch: ModuleType, config, hf: str) -> str:
    (ours,) = arch.sanitize({f"{hf}.weight": torch.empty(1, 1, device="meta")}, config)
    return ours.removesuffix(".weight")


def save_adapter(net: nn.Module, folder: Path, base_model: str, dropout: float = 0.0) -> None:
    """The adapters of `net` as PEFT writes them: adapter_config.json and
    adapter_model.safetensors with `base_model.model.<HF module>.lora_A.weight` [r, in] and
    `lora_B.weight` [out, r]; `PeftModel.from_pretrained(hf_model, folder)` loads them."""
    modules, arch = lora_modules(net), import_module(type(net).__module__)
    first = next(iter(modules.values()))
    r = first.lora_A.shape[0]
    tensors = {}
    for name, module in modules.items():
        key = f"base_model.model.{_hf_module(arch, net.config, name)}"
        tensors[f"{key}.lora_A.weight"] = module.lora_A
        tensors[f"{key}.lora_B.weight"] = module.lora_B
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": r,
        "lora_alpha": first.scaling * r,
        "lora_dropout": dropout,
        "target_modules": sorted({name.rsplit(".", 1)[-1] for name in modules}),
        "bias": "none",
        "fan_in_fan_out": type(net).__name__ == "GPT2",  # HF's GPT-2 layers are Conv1D
        "inference_mode": True,
        "init_lora_weights": True,
        "use_rslora": False,
        "use_dora": False,
        "modules_to_save": None,
    }
    folder.mkdir(parents=True, exist_ok=True)
    save_safetensors(folder / ADAPTER_WEIGHTS, tensors, metadata={"format": "pt"})
    write_atomic(folder / ADAPTER_CONFIG, json_text(config))


def apply_adapter(net: nn.Module, folder: str | Path) -> None:
    """Merge the PEFT LoRA adapter in `folder` into `net`'s weights (ours or PEFT's own)."""
    folder, arch = Path(folder), import_module(type(net).__module__)
    config = read_json(folder / ADAPTER_CONFIG)
    if config.get("peft_type") != "LORA":
        raise CheckpointError(
            f"{folder / ADAPTER_CONFIG}: peft_type {config.get('peft_type')!r:.40} is not "
            "supported (expected LORA)"
        )
    r, alpha = config.get("r"), config.get("lora_alpha")
    if not (_positive(r) and _positive(alpha)):
        raise CheckpointError(f"{folder / ADAPTER_CONFIG}: r and lora_alpha must be numbers > 0")
    if config.get("use_dora") or config.get("use_rslora"):
        raise CheckpointError(f"{folder / ADAPTER_CONFIG}: DoRA and rsLoRA are not supported")
    tensors = load_safetensors(folder / ADAPTER_WEIGHTS)
    pairs: dict[str, dict[str, Tensor]] = {}
    for key, tensor in tensors.items():
        head, _, part = key.removeprefix("base_model.model.").rpartition(".lora_")
        if part not in ("A.weight", "B.weight"):
            raise CheckpointError(f"{folder / ADAPTER_WEIGHTS}: unexpected tensor {key}")
        pairs.setdefault(head, {})[part[0]] = tensor
    with torch.no_grad():
        for hf_name, pair in pairs.items():
            name = _our_module(arch, net.config, hf_name)
            try:
                weight = net.get_submodule(name).weight
            except AttributeError:
                raise CheckpointError(
                    f"{folder}: the adapter has {hf_name}, which the model does not"
                ) from None
            if set(pair) != {"A", "B"}:
                raise CheckpointError(f"{folder}: {hf_name} lacks lora_A or lora_B")
            a, b = pair["A"].float(), pair["B"].float()
            if a.shape != (r, weight.shape[1]) or b.shape != (weight.shape[0], r):
                raise CheckpointError(
                    f"{folder}: {hf_name}: lora_A {tuple(a.shape)} and lora_B "
                    f"{tuple(b.shape)} do not fit a weight of {tuple(weight.shape)} at rank {r}"
                )
            weight += ((b @ a) * (alpha / r)).to(weight.dtype)


def _positive(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and value > 0


def json_text(data: dict) -> str:
    return json.dumps(data, indent=2) + "\n"
