"""Architectures, one file each, found by the checkpoint's `model_type` (mlx-lm's registry).

Each module provides `Config.from_dict` (from the checkpoint's own config.json), the model class
(`Model`) and `sanitize`, which maps a Hugging Face checkpoint's tensor names and layout onto the
model's. Models know no other file format: `loading/gguf_arch.py` maps GGUF files onto them.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from dataclasses import MISSING, fields
from importlib import import_module
from types import ModuleType

ARCHITECTURES = {
    "gpt2": "gpt2",
    "llama": "llama",
    "mistral": "llama",
    "qwen2": "llama",
    "gemma3": "gemma3",
    "gemma3_text": "gemma3",
}


def get_architecture(model_type: str) -> ModuleType:
    """The module implementing `model_type`; ValueError names the supported ones."""
    if model_type not in ARCHITECTURES:
        raise ValueError(
            f"model_type {model_type!r} is not supported (supported: {', '.join(ARCHITECTURES)})"
        )
    return import_module(f"tinyformers.models.{ARCHITECTURES[model_type]}")


def architecture_of(net) -> ModuleType:
    """The architecture file of a built model, also where kernels/ swapped in a subclass of
    its class from outside (the first class of its MRO defined in models/)."""
    cls = next(c for c in type(net).__mro__ if c.__module__.startswith(f"{__name__}."))
    return import_module(cls.__module__)


def config_fields(cls: type, d: dict) -> dict:
    """The entries of a checkpoint's config dict that are fields of the dataclass `cls`, each
    checked against the field's type (unknown keys ignored, None taken as absent).

    Sizes are integers in 1..2^31-1, token ids in 0..2^31-1, floats finite and > 0, flags real
    booleans (the string "false" is not false): a loaded model never fails later on a value.
    ValueError names the key, the value and what was expected.

    Example: config_fields(GPT2Config, {"n_head": 0, ...}) raises
        ValueError: n_head = 0: expected an integer from 1 to 2147483647
    """
    if not isinstance(d, dict):
        raise ValueError(f"expected a JSON object of settings, got {type(d).__name__}")
    out = {}
    for f in fields(cls):
        value = d.get(f.name)
        if value is None:
            if f.default is MISSING:
                raise ValueError(
                    f"field {f.name!r} is missing (expected {_expected(f.name, f.type)})"
                )
            continue
        out[f.name] = check_value(f.name, str(f.type), value)
    for name, value in out.items():  # token ids name rows of the embedding
        ids = value if isinstance(value, list) else [value]
        if name.endswith("_token_id") and any(i >= out.get("vocab_size", i + 1) for i in ids):
            raise ValueError(
                f"{name} = {value!r:.60}: expected ids below vocab_size {out['vocab_size']}"
            )
    return out


def check_value(name: str, kind: str, value):
    """`value` if it is a valid `kind` ("int", "float", "bool", "str", "dict", as the dataclass
    annotations spell them); else ValueError naming `name`, the value and what was expected."""
    if not _valid(name, kind, value):
        raise ValueError(f"{name} = {value!r:.60}: expected {_expected(name, kind)}")
    return value


def check_layer_count(n_layer: int, names: Iterable[str]) -> None:
    """ValueError unless the checkpoint's tensor names hold at least `n_layer` blocks.

    Run before the model is built: building 10^5 blocks (even on the meta device) takes
    minutes, while a config that asks for more blocks than the file holds can never load.
    A block's tensors carry its index as their first numeric name part (h.3., layers.3., blk.3.).
    """
    blocks = {m.group(1) for name in names if (m := _BLOCK_INDEX.search(name))}
    if n_layer > len(blocks):
        raise ValueError(
            f"the config asks for {n_layer} layers, the weights hold tensors for {len(blocks)}"
        )


_BLOCK_INDEX = re.compile(r"(?:^|\.)(\d+)\.")
MAX_SIZE = 2**31 - 1  # what torch's int32 index math and every real config stay within


def _valid(name: str, kind: str, value) -> bool:
    if isinstance(value, bool) or kind.startswith("bool"):
        return isinstance(value, bool) and kind.startswith("bool")
    if kind.startswith("int"):
        low = 0 if name.endswith("_token_id") else 1
        if isinstance(value, list) and "list[int]" in kind:
            return all(_valid(name, "int", v) for v in value)
        return isinstance(value, int) and low <= value <= MAX_SIZE
    if kind.startswith("float"):
        if _is_probability(name):
            return isinstance(value, int | float) and 0 <= value < 1
        return isinstance(value, int | float) and math.isfinite(value) and value > 0
    return {"str": str, "dict": dict}.get(kind.split()[0], object) in type(value).__mro__


def _expected(name: str, kind) -> str:
    kind = str(kind)
    if kind.startswith("int"):
        low = 0 if name.endswith("_token_id") else 1
        many = " (or a list of them)" if "list[int]" in kind else ""
        return f"an integer from {low} to {MAX_SIZE}{many}"
    if kind.startswith("float"):
        return "a probability from 0 to below 1" if _is_probability(name) else "a finite number > 0"
    return {"bool": "true or false", "str": "a string", "dict": "a JSON object"}.get(
        kind.split()[0], kind
    )


def prefixed(weights: dict, prefix: str, tied: bool) -> dict:
    """Our tensor names -> a Hugging Face checkpoint's, where they differ by a prefix on
    every tensor but lm_head (`model.` for Llama and Gemma), and lm_head is left out when it
    is the embedding (HF's own files leave it out): each architecture's `to_hf`."""
    out = {}
    for name, w in weights.items():
        if name != "lm_head.weight":
            out[prefix + name] = w
        elif not tied:
            out[name] = w
    return out


def _is_probability(name: str) -> bool:
    """Dropout settings (GPT-2's `*_pdrop`, Llama's `attention_dropout`) may be 0."""
    return name.endswith("pdrop") or name.endswith("dropout")


def set_fast_path(net, on: bool = True) -> None:
    """Let every module that has one take its fast path (SDPA, fused layer norm) in place of
    the written-out math; the values agree within float rounding (tests/test_models.py)."""
    for module in net.modules():
        if hasattr(module, "fast"):
            module.fast = on
