"""The loss a language model learns from: how surprised it is by each next token.

For each position the model gives logits, one score per token of the vocabulary. Softmax
turns them into probabilities p; the loss at that position is -log p[target], the negative
log-probability of the token that really came next (0 when the model was sure and right,
large when it gave the truth little chance). The loss of a batch is the mean over its
positions. This is cross-entropy; `F.cross_entropy` computes the same number in one call
(tests/test_training.py checks that they agree).
"""

from __future__ import annotations

import torch
from torch import Tensor

IGNORE = -100  # a target that counts for nothing: padding, or a prompt token in chat data


def cross_entropy(logits: Tensor, targets: Tensor) -> Tensor:
    """Mean of -log softmax(logits)[target] over the positions whose target is not IGNORE.

    logits [B, T, V] (float), targets [B, T] (token ids, or IGNORE) -> a scalar.

    Example: logits that put all their weight on the target give a loss near 0; uniform
    logits over V tokens give log(V) (log(65) = 4.17 for Shakespeare's characters).
    """
    # log softmax: logits - log(sum(exp(logits))), computed stably by torch (subtracting the
    # row's max first, so exp never overflows)
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # bf16 -> f32
    log_probs = logits.log_softmax(dim=-1)  # (B, T, V): log p of every token
    keep = targets != IGNORE  # (B, T)
    picked = log_probs.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)  # (B, T)
    # subtle: the mean is over the kept positions only; a batch with none has loss 0, not NaN
    return -(picked * keep).sum() / keep.sum().clamp(min=1)
