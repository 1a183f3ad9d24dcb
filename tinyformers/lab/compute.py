"""The lab's numbers: everything the page draws for one prompt, from the model's own methods.

`run_with_cache` gives the attention patterns, `logit_lens` the lens, `run_with_hooks` the
logits with a head switched off, and the embedding matrix the vectors and their nearest
tokens. The page only colours and ranks what this file returns; the temperature is applied
in the browser, to the logits sent here, so moving the slider costs no forward pass.
"""

from __future__ import annotations

import threading
import time

import torch
from torch import Tensor, nn

from tinyformers.explain import head_scores, most_interesting_head, piece_label
from tinyformers.explain.data import model_name
from tinyformers.lab.links import view_links
from tinyformers.lens import act_name
from tinyformers.tokenizers import prompt_ids

MAX_CHARS = 2000  # characters of a prompt, checked before tokenizing it
# Tokens of a prompt: the page draws a T x T grid per head, and the logit lens holds
# (n_layer + 1) x T x V floats (390 MB for SmolLM2 at 64 tokens).
MAX_TOKENS = 64
NEAREST = 5  # tokens listed beside each prompt token, by cosine similarity
TOP = 50  # next tokens sent with their pieces (the page lists 10; the rest for the ablated top)
# The prompt the page opens with, by model name; "The capital of France is" for the others.
EXAMPLES = {"shakespeare": "ROMEO:\nBut, soft! what light through yonder window breaks?"}


class LabError(ValueError):
    """A request the lab refuses: one line, and the HTTP status to answer with."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


class Lab:
    """One model seen through the page. Requests take turns: a hook is set on the model
    itself while it runs, so two forward passes at once would see each other's hooks."""

    def __init__(self, model, lock: threading.Lock | None = None) -> None:
        if model.tokenizer is None:
            raise LabError(f"{model.source}: no tokenizer files; the lab needs text", 500)
        if getattr(model.net, "world", None):
            raise LabError("the lab does not run under tensor parallel", 501)
        self.model = model
        self.lock = lock or threading.Lock()  # shared with other users of the model's hooks
        self.n_layer = model.config.layer_count
        # the pattern of one token says how many query heads there are, whatever the config
        with self.lock:
            _, cache = model.run_with_cache([0], names=[act_name("pattern", 0)])
        self.n_head = cache["pattern", 0].shape[1]
        self.embedding = token_embedding(model.net)
        self.unit_rows: Tensor | None = None  # (V, C) the embedding's rows scaled to length 1

    def describe(self) -> dict:
        """What the page needs before any prompt: the model's shape, limits and links."""
        net = self.model.net
        return {
            "model": model_name(self.model.source),
            "architecture": type(net).__name__,
            "n_layer": self.n_layer,
            "n_head": self.n_head,
            "vocab": self.model.config.vocab_size,
            "max_chars": MAX_CHARS,
            "max_tokens": MAX_TOKENS,
            "example": EXAMPLES.get(model_name(self.model.source), "The capital of France is"),
            "links": view_links(net),
        }

    def run(self, prompt: str) -> dict:
        """Tokens, embeddings, every head's pattern, the logit lens and the next-token logits.

        subtle: the patterns are sent as the causal half only ([layer][head][query][key <=
        query]) and every float rounded to 4 decimals: a 20-token SmolLM2 answer is ~1 MB of
        JSON instead of ~3.
        """
        ids = self.ids(prompt)
        tokenizer = self.model.tokenizer
        names = [act_name("pattern", i) for i in range(self.n_layer)]
        start = time.perf_counter()
        with self.lock:
            logits, cache = self.model.run_with_cache(ids, names=names)
            lens = torch.softmax(self.model.logit_lens(ids).float(), dim=-1)  # (L + 1, T, V)
            vectors, nearest = self.neighbours(ids)
        lens_probs, lens_ids = lens.max(dim=-1)  # (L + 1, T) each
        patterns = {i: cache["pattern", i][0].float() for i in range(self.n_layer)}  # (H, T, T)
        layer, head = most_interesting_head(patterns)
        return {
            "ids": ids,
            "pieces": [piece_label(tokenizer, i) for i in ids],
            "embeddings": {"vectors": rounded(vectors), "nearest": nearest},
            "patterns": [
                [[row[: q + 1] for q, row in enumerate(h)] for h in rounded(p)]
                for p in patterns.values()
            ],
            "scores": [rounded(head_scores(p)) for p in patterns.values()],  # (L, H)
            "start": {"layer": layer, "head": head},
            "lens": {
                "pieces": [[piece_label(tokenizer, i) for i in row] for row in lens_ids.tolist()],
                "probs": rounded(lens_probs),
            },
            "next": self.next_tokens(logits[0, -1]),
            "seconds": round(time.perf_counter() - start, 3),
        }

    def ablate(self, prompt: str, layer: int, head: int) -> dict:
        """The next-token logits with one head's output zeroed: its z, the weighted sum of
        values ([B, T, heads, head size]) that o_proj / c_proj would mix into the stream."""
        ids = self.ids(prompt)
        check_index("layer", layer, self.n_layer)
        check_index("head", head, self.n_head)

        def zero_head(z: Tensor, name: str) -> Tensor:  # (B, T, nh, hs)
            return z.index_fill(2, torch.tensor([head], device=z.device), 0)

        start = time.perf_counter()
        with self.lock:
            logits = self.model.run_with_hooks(ids, [(act_name("z", layer), zero_head)])
        return {
            "layer": layer,
            "head": head,
            "next": self.next_tokens(logits[0, -1]),
            "seconds": round(time.perf_counter() - start, 3),
        }

    def ids(self, prompt) -> list[int]:
        """The prompt's ids as generation reads them, or a LabError that says what is wrong."""
        if not isinstance(prompt, str):
            raise LabError(f"prompt: expected a string, not {type(prompt).__name__}")
        if len(prompt) > MAX_CHARS:
            raise LabError(f"prompt: {len(prompt)} characters; the lab takes at most {MAX_CHARS}")
        ids = prompt_ids(self.model.tokenizer, prompt)
        if not ids:
            raise LabError("prompt: empty, and the model has no BOS token to start from")
        limit = min(MAX_TOKENS, self.model.config.context_length)
        if len(ids) > limit:
            raise LabError(f"prompt: {len(ids)} tokens; the lab takes at most {limit}")
        return ids

    def neighbours(self, ids: list[int]) -> tuple[Tensor, list[list[list]]]:
        """(the prompt tokens' rows of the embedding matrix (T, C), and for each token its
        NEAREST other tokens by cosine similarity: [[piece, id, cosine], ...])."""
        if self.unit_rows is None:  # once: every row, as the model reads it (packed or not)
            every_id = torch.arange(self.model.config.vocab_size, device=self.model.device)
            with torch.inference_mode():
                rows = self.embedding(every_id).float()  # (V, C)
            self.unit_rows = rows / rows.norm(dim=-1, keepdim=True).clamp(min=1e-12)  # (V, C)
        with torch.inference_mode():
            index = torch.tensor(ids, device=self.unit_rows.device)
            vectors = self.embedding(index).float()  # (T, C)
            cosines = self.unit_rows[index] @ self.unit_rows.T  # (T, C) @ (C, V) -> (T, V)
            cosines[torch.arange(len(ids)), index] = -2  # a token is not its own neighbour
            top = cosines.topk(NEAREST, dim=-1)  # (T, NEAREST) each
        tokenizer = self.model.tokenizer
        nearest = [
            [[piece_label(tokenizer, i), i, round(c, 4)] for i, c in zip(row, cos, strict=True)]
            for row, cos in zip(top.indices.tolist(), top.values.tolist(), strict=True)
        ]
        return vectors, nearest

    def next_tokens(self, logits: Tensor) -> dict:
        """The last position's logits (V,), every one (the page's softmax at any temperature
        needs them all), and the TOP most likely as [id, piece]."""
        top = logits.float().topk(min(TOP, logits.numel())).indices.tolist()
        # +-inf (a model that masks tokens) has no JSON form; 1e30 away is as far for exp()
        finite = logits.float().clamp(-1e30, 1e30)
        return {
            "logits": rounded(finite),
            "top": [[i, piece_label(self.model.tokenizer, i)] for i in top],
        }


def token_embedding(net: nn.Module) -> nn.Module:
    """The module that maps token ids to vectors: GPT-2 calls it wte, Llama and Gemma 3
    embed_tokens (an nn.Embedding, or the kernels' PackedEmbedding over the same matrix)."""
    return net.wte if hasattr(net, "wte") else net.embed_tokens


def check_index(what: str, value, count: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise LabError(f"{what}: expected an integer, not {value!r:.40}")
    if not 0 <= value < count:
        raise LabError(f"{what} {value} is out of range: {what}s are 0 to {count - 1}")


def rounded(x: Tensor) -> list:
    """`x` as nested lists of floats with 4 decimals (their shortest text form)."""
    return x.double().mul(1e4).round().div(1e4).tolist()
