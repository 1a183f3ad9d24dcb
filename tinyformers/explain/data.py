"""What `tinyformers explain` shows, computed once from the model's own methods.

The numbers come from `LanguageModel.run_with_cache` (logits, attention patterns) and
`LanguageModel.logit_lens`; this file only ranks them and turns ids into readable pieces, so
the terminal tables, the PNGs and the HTML page show the same values.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from tinyformers.errors import ContextLengthError, TinyformersError
from tinyformers.lens import act_name
from tinyformers.tokenizers import prompt_ids

# The logit lens holds (n_layer + 1) x T x V floats: 1.5 GB for SmolLM2 at 256 tokens.
MAX_TOKENS = 256

# How a piece's invisible characters are drawn, so ' Paris' and 'Paris' look different.
VISIBLE = {" ": "␣", "\n": "↵", "\t": "⇥", "\r": "␍"}


@dataclass
class Explanation:
    """One prompt seen through the model. L layers, H heads, T tokens, k ranked tokens."""

    model_name: str
    ids: list[int]  # (T,) the prompt's token ids
    pieces: list[str]  # (T,) each token as a label (piece_label)
    next_ids: list[int]  # (k,) the most likely next tokens, best first
    next_pieces: list[str]  # (k,)
    next_probs: list[float]  # (k,) softmax of the last position's logits
    next_logits: list[float]  # (k,)
    lens_pieces: list[list[str]]  # (L + 1, T) top-1 token of the logit lens after l blocks
    lens_probs: list[list[float]]  # (L + 1, T) its probability
    patterns: dict[int, Tensor]  # layer -> (H, T, T) float32 attention weights, query x key

    @property
    def n_layer(self) -> int:
        return len(self.lens_probs) - 1


def explain(model, text: str, top_k: int = 10, layers: list[int] | None = None) -> Explanation:
    """Tokens, next-token ranking, logit lens and the attention patterns of `layers` (None: all).

    Example: explain(tinyformers.load(), "The capital of France is").next_pieces[0] == "␣Paris"
    """
    tokenizer = model.tokenizer
    if tokenizer is None:
        raise TinyformersError(f"{model.source}: no tokenizer files: explain needs text")
    limit = min(MAX_TOKENS, model.config.context_length)
    # subtle: a token holds at most `max_token_bytes` bytes and a character at least one, so a
    # longer text can never fit: refused before tokenizing it (10 MB took 656 MB to tokenize)
    if len(text) > limit * tokenizer.max_token_bytes:
        raise ContextLengthError(
            f"the prompt is {len(text)} characters, more than {limit} tokens can hold; explain "
            f"takes at most {limit} tokens (a table column and a heat-map row per token)"
        )
    ids = prompt_ids(tokenizer, text)  # as generation reads it: BOS where the tokenizer asks
    if not ids:
        raise TinyformersError("the prompt is empty and the model has no BOS token to start from")
    if len(ids) > limit:
        raise ContextLengthError(
            f"the prompt is {len(ids)} tokens; explain takes at most {limit} "
            "(a table column and a heat-map row per token)"
        )
    n_layer = model.config.layer_count
    layers = list(range(n_layer)) if layers is None else layers
    logits, cache = model.run_with_cache(ids, names=[act_name("pattern", i) for i in layers])
    probs = torch.softmax(logits[0, -1].float(), dim=-1)  # (V,)
    top = probs.topk(min(top_k, probs.numel()))
    lens = torch.softmax(model.logit_lens(ids).float(), dim=-1)  # (L + 1, T, V)
    lens_probs, lens_ids = lens.max(dim=-1)  # (L + 1, T) each
    label = {i: piece_label(tokenizer, i) for i in set(ids + top.indices.tolist())}
    label.update({i: piece_label(tokenizer, i) for i in set(lens_ids.flatten().tolist())})
    return Explanation(
        model_name=model_name(model.source),
        ids=ids,
        pieces=[label[i] for i in ids],
        next_ids=top.indices.tolist(),
        next_pieces=[label[i] for i in top.indices.tolist()],
        next_probs=top.values.tolist(),
        next_logits=logits[0, -1, top.indices].tolist(),
        lens_pieces=[[label[i] for i in row] for row in lens_ids.tolist()],
        lens_probs=lens_probs.tolist(),
        patterns={i: cache["pattern", i][0].float() for i in layers},
    )


def head_scores(pattern: Tensor) -> Tensor:
    """How sharply each head looks at one particular other token: (H,) for one layer's
    pattern (H, T, T), the largest weight a query gives a key that is neither the first
    token nor itself, averaged over the queries that have such a key (positions 2 and
    later); 0 for a prompt of one or two tokens.

    Most heads park their attention on the first token (an "attention sink"), keep it on the
    token itself, or spread it thin; a head that scores high moves information from one
    chosen token to another (a previous-token head scores 1), so it is worth looking at first.
    """
    H, T, _ = pattern.shape  # (H, T, T) query x key
    if T < 3:
        return pattern.new_zeros(H)
    elsewhere = torch.ones(T, T, dtype=torch.bool, device=pattern.device)
    elsewhere[:, 0] = False  # not the first token
    elsewhere.fill_diagonal_(False)  # not the token itself
    others = pattern.masked_fill(~elsewhere, 0)[:, 2:]  # (H, T - 2, T)
    return others.amax(dim=-1).mean(dim=-1)  # (H,)


def most_interesting_head(patterns: dict[int, Tensor]) -> tuple[int, int]:
    """(layer, head) of the highest `head_scores` among `patterns` ({layer: (H, T, T)}), the
    first one on a tie, so a prompt too short to tell heads apart opens on the first head.

    Example: most_interesting_head(explain(model, "The capital of France is").patterns)
    """
    scores = {
        (layer, head): score
        for layer, pattern in patterns.items()
        for head, score in enumerate(head_scores(pattern).tolist())
    }
    return max(scores, key=scores.__getitem__)  # max keeps the first of equal scores


def piece_label(tokenizer, token_id: int) -> str:
    """The token's text with spaces, newlines and tabs drawn (␣ ↵ ⇥), other control
    characters escaped; bytes that are part of a UTF-8 character shown as \\xNN."""
    data = tokenizer.decode_bytes([token_id])
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:  # one token may hold half an emoji: show its bytes
        return "".join(f"\\x{b:02x}" for b in data)
    return "".join(VISIBLE.get(c, c if c.isprintable() else repr(c)[1:-1]) for c in text)


def model_name(source: Path) -> str:
    """A short name for titles: the file's name, the folder's, or the Hub repo of a cache
    snapshot (models--org--name/snapshots/<hash> -> org/name)."""
    if source.parent.name == "snapshots":
        return source.parent.parent.name.removeprefix("models--").replace("--", "/")
    return source.name
