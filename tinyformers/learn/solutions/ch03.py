"""Chapter 3: attention (docs/learn/03-attention.md).

Write the body of each function, then run `tinyformers learn check 3`. The inputs are one
head's q, k and v, [T, d_head] each, as chapter 3 takes them from the model's cache.
"""

import math

import torch


def attention_scores(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """The scores [T, T] of one head: row i holds the dot products of query i with every
    key, times 1/sqrt(d_head); the scores of keys after the query (column j > row i) are
    -inf, the causal mask."""
    T, d_head = q.shape
    scores = q @ k.T / math.sqrt(d_head)  # [T, d_head] @ [d_head, T] -> [T, T]
    allowed = torch.ones(T, T, dtype=torch.bool).tril()  # True on and below the diagonal
    return scores.masked_fill(~allowed, float("-inf"))


def attention_pattern(scores: torch.Tensor) -> torch.Tensor:
    """The pattern [T, T]: the softmax of each row of the scores, so each row is positive
    (0 where a score was -inf) and sums to 1."""
    return torch.softmax(scores, dim=-1)


def head_output(pattern: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """The head's output z [T, d_head]: row i is the sum of the value vectors, each times
    the weight that row i of the pattern gives it."""
    return pattern @ v  # [T, T] @ [T, d_head] -> [T, d_head]
