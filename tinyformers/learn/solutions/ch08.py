"""Chapter 8: circuits (docs/learn/08-circuits.md).

Write the body of each function, then run `tinyformers learn check 8`. A pattern is one
layer's attention, [n_heads, T, T] (row = query, column = key); `model` is
`tinyformers.load("shakespeare", fast=False)`.
"""

import torch


def previous_token_scores(pattern: torch.Tensor) -> torch.Tensor:
    """For each head [n_heads]: the mean attention that a token (from position 1 on) pays
    to the token just before it, pattern[h, i, i - 1]."""
    T = pattern.shape[-1]
    i = torch.arange(1, T)
    return pattern[:, i, i - 1].mean(-1)


def induction_scores(pattern: torch.Tensor, n: int) -> torch.Tensor:
    """For each head [n_heads], on a sequence of n tokens repeated once (T = 2n): the mean
    attention that a token of the second copy (position i from n to 2n - 1) pays to the
    token after its previous occurrence, position i - n + 1."""
    i = torch.arange(n, 2 * n)
    return pattern[:, i, i - n + 1].mean(-1)


def ablated_loss(model, text: str, layer: int, head: int) -> float:
    """The model's loss on `text` (mean cross-entropy of each next character) with one head
    zeroed: its output z (`blocks.L.attn.hook_z`, [B, T, n_heads, d_head]) set to 0."""

    def zero_head(z, name):
        z = z.clone()
        z[:, :, head] = 0.0
        return z

    ids = torch.tensor(model.tokenizer.encode(text))
    logits = model.run_with_hooks(text, [(f"blocks.{layer}.attn.hook_z", zero_head)])[0]
    return float(torch.nn.functional.cross_entropy(logits[:-1], ids[1:]))
