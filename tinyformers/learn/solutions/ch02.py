"""Chapter 2: tokens and embeddings (docs/learn/02-tokens-and-embeddings.md).

Write the body of each function, then run `tinyformers learn check 2`. `model` is
`tinyformers.load("shakespeare", fast=False)`: `model.tokenizer.encode(text)` gives the token
ids, `model.W_E` is the embedding matrix [V, C] and `model.W_pos` the positions' [256, C].
"""

import torch


def one_hot(token_id: int, vocab_size: int) -> torch.Tensor:
    """A vector of `vocab_size` zeros with a 1.0 at index `token_id` (float32).
    Example: one_hot(2, 4) is tensor([0., 0., 1., 0.])."""
    x = torch.zeros(vocab_size)
    x[token_id] = 1.0
    return x


def embed(model, text: str) -> torch.Tensor:
    """What the first block of the model reads for `text`, [T, C]: the row of W_E of each
    token, plus the row of W_pos of its position (0, 1, 2, ...)."""
    ids = torch.tensor(model.tokenizer.encode(text))
    return model.W_E[ids] + model.W_pos[: len(ids)]  # [T, C] + [T, C]
