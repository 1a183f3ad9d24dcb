"""Chapter 7: the loss and a gradient step (docs/learn/07-loss-and-a-gradient-step.md).

Write the body of each function, then run `tinyformers learn check 7`. `model` is
`tinyformers.load("shakespeare", fast=False)`.
"""

import torch


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The loss: for each row of `logits` [N, V] the -log of the softmax probability of
    that row's target (an id in `targets` [N]), averaged over the N rows."""
    log_probs = logits.log_softmax(-1)  # [N, V]: log of each probability
    return -log_probs[torch.arange(len(targets)), targets].mean()


def slope(f, w: float, h: float = 1e-4) -> float:
    """The derivative of f at w, estimated from two nudges: (f(w + h) - f(w - h)) / (2 h)."""
    return (f(w + h) - f(w - h)) / (2 * h)


def text_loss(model, text: str) -> float:
    """The model's loss on `text`: at each position but the last, the cross-entropy of its
    logits against the character that comes next; the mean, as a float."""
    ids = torch.tensor(model.tokenizer.encode(text))
    logits = model(ids[None])[0]  # [T, V]
    return float(cross_entropy(logits[:-1], ids[1:]))
