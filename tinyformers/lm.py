"""`tinyformers.load` and the handle it returns: network, tokenizer and generation together.

The network (`model.net`) only maps token ids to logits; tokenizing, sampling and stopping live
in their own packages and meet here.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import torch
from torch import Tensor, nn

from tinyformers.loading.loader import load_model


class LanguageModel:
    """A loaded model. Example: `tinyformers.load("gpt2").generate("Hello", max_new_tokens=20)`."""

    def __init__(self, net: nn.Module, tokenizer, source: Path, load_seconds: float = 0.0):
        self.net = net
        self.tokenizer = tokenizer
        self.source = source
        self.load_seconds = load_seconds

    @property
    def config(self):
        return self.net.config

    @property
    def dtype(self) -> torch.dtype:
        return next(self.net.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.net.parameters()).device

    def __call__(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """Float logits [batch, seq, vocab] for `input_ids` [batch, seq] (left padding allowed)."""
        with torch.inference_mode():
            input_ids = torch.as_tensor(input_ids, device=self.device)
            if attention_mask is not None:
                attention_mask = torch.as_tensor(attention_mask, device=self.device)
            return self.net(input_ids, attention_mask)

    def __repr__(self) -> str:
        n = sum(p.numel() for p in self.net.parameters())
        name = type(self.net).__name__
        return f"LanguageModel({name}, {n / 1e6:.0f}M params, {self.dtype}, {self.source})"


def load(
    name_or_path: str | os.PathLike,
    dtype: str | torch.dtype | None = None,
    device: str | torch.device | None = None,
) -> LanguageModel:
    """Load a checkpoint folder, a .gguf file or a Hugging Face name (cache first, then the Hub).

    dtype: float32 (default), bfloat16 or float16; device: cpu (default) or cuda.
    """
    start = time.perf_counter()
    net, path = load_model(name_or_path, dtype, device)
    tokenizer = _tokenizer_for(path)
    return LanguageModel(net, tokenizer, path, time.perf_counter() - start)


def _tokenizer_for(path: Path):
    """The checkpoint's tokenizer, or None for a folder that ships weights only."""
    from tinyformers.tokenizers import load_tokenizer

    has_files = path.is_file() or any(
        (path / f).is_file() for f in ("tokenizer.json", "vocab.json")
    )
    return load_tokenizer(path) if has_files else None
