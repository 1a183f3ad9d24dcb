"""Chapter 4: softmax and temperature (docs/learn/04-softmax-and-temperature.md).

Write the body of each function, then run `tinyformers learn check 4`. `logits` is a 1-D
tensor of floats; `model` is `tinyformers.load("shakespeare", fast=False)`.
"""

import torch


def softmax(logits: torch.Tensor) -> torch.Tensor:
    """Probabilities from logits: exp of each, divided by their sum. Subtract the largest
    logit first (the result is the same), or exp(1000) overflows to inf."""
    e = (logits - logits.max()).exp()
    return e / e.sum()


def with_temperature(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """The probabilities of sampling at `temperature` (> 0): the softmax of logits divided
    by the temperature."""
    return softmax(logits / temperature)


def greedy_next(model, text: str) -> str:
    """The character the model finds most likely to come after `text` (temperature 0)."""
    ids = torch.tensor([model.tokenizer.encode(text)])  # [1, T]
    logits = model(ids)[0, -1]  # [V]: the last position's logits
    return model.tokenizer.decode([int(logits.argmax())])
