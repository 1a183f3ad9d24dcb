"""Choosing the next token: logits transforms with Hugging Face's semantics, then sample or argmax.

Order, as in transformers' `generate`: repetition penalty, then temperature, top-k, top-p, min-p.
Defaults are llama.cpp's (temperature 0.8, top-k 40, top-p 0.95, min-p 0.05); temperature 0 is
greedy, top_k 0, top_p 1 and min_p 0 switch a filter off.
"""

from __future__ import annotations

import torch
from torch import Tensor

from tinyformers.errors import TinyformersError
from tinyformers.generation.params import SamplingParams


def repetition_penalty(logits: Tensor, history: Tensor, penalty: float) -> Tensor:
    """Make tokens already in `history` ([B, L] ids) less likely: divide a positive logit by
    `penalty`, multiply a negative one (CTRL, Keskar et al. 2019; HF's semantics)."""
    seen = logits.gather(1, history)  # (B, L)
    seen = torch.where(seen < 0, seen * penalty, seen / penalty)
    return logits.scatter(1, history, seen)  # a token seen twice is penalised once


def top_k(logits: Tensor, k: int) -> Tensor:
    """Keep the k highest logits (ties with the k-th kept too)."""
    kth = torch.topk(logits, min(k, logits.shape[-1])).values[..., -1:]  # (B, 1)
    return logits.masked_fill(logits < kth, -torch.inf)


def top_p(logits: Tensor, p: float) -> Tensor:
    """Nucleus: keep the smallest set of most likely tokens whose probability reaches p."""
    sorted_logits, order = torch.sort(logits, descending=False)  # (B, V) ascending
    cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    remove = cumulative <= 1 - p  # the unlikely tail that sums to at most 1 - p
    remove[..., -1:] = False  # the most likely token always stays
    return logits.masked_fill(remove.scatter(1, order, remove), -torch.inf)


def min_p(logits: Tensor, p: float) -> Tensor:
    """Keep tokens at least p times as likely as the most likely one (Nguyen et al. 2024)."""
    probs = logits.softmax(dim=-1)
    remove = probs < p * probs.amax(dim=-1, keepdim=True)
    remove.scatter_(-1, probs.argmax(dim=-1, keepdim=True), False)
    return logits.masked_fill(remove, -torch.inf)


def process_logits(logits: Tensor, params: SamplingParams, history: Tensor | None) -> Tensor:
    """The transformed logits (B, V) a token is drawn from."""
    logits = logits.float()
    if params.repetition_penalty != 1 and history is not None:
        logits = repetition_penalty(logits, history, params.repetition_penalty)
    if params.greedy:
        return logits
    if params.temperature < 1e-6:
        # subtle: logits / 1e-45 overflow to inf and the softmax gives NaN; shifted so the
        # largest is 0 first, the others go to -inf and the draw is the argmax, as it should
        logits = logits - logits.amax(dim=-1, keepdim=True)
    logits = logits / params.temperature
    if params.top_k > 0:
        logits = top_k(logits, params.top_k)
    if params.top_p < 1:
        logits = top_p(logits, params.top_p)
    if params.min_p > 0:
        logits = min_p(logits, params.min_p)
    return logits


def next_tokens(
    logits: Tensor,
    params: SamplingParams,
    history: Tensor | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """One token id per row (B,): argmax when greedy, else a draw from the filtered softmax."""
    logits = process_logits(logits, params, history)
    if params.greedy:
        return logits.argmax(dim=-1)
    probs = logits.softmax(dim=-1)
    try:
        return torch.multinomial(probs, 1, generator=generator).squeeze(1)
    except RuntimeError as e:  # only NaN or inf probabilities make multinomial fail
        raise TinyformersError(
            "the model's logits are not finite (NaN or infinity): its weights overflow"
        ) from e
