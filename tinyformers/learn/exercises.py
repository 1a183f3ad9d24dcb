"""The exercises of each chapter and their checks: fixed inputs, a reference computed another
way (torch's own function, or the value the model itself computes, read from its cache), and
the tolerance each number must meet.

The inputs are fixed (seeded), so a check says the same thing every run. The model is the
bundled `shakespeare` GPT-2, loaded with fast=False so its matrices are plain tensors.
"""

from __future__ import annotations

import math
from functools import cache

import torch
import torch.nn.functional as F

from tinyformers.learn.checks import Exercise, compare

PROMPT = "To be, or not to be, that is the question"


@cache
def shakespeare():
    import tinyformers

    return tinyformers.load("shakespeare", fast=False)


def numbers(*shape: int, seed: int, scale: float = 1.0) -> torch.Tensor:
    """Fixed random numbers: the same ones every run."""
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale


def first(*problems: str | None) -> str | None:
    """The first problem found, or None when every case passed."""
    return next((p for p in problems if p is not None), None)


# Chapter 1: plain Python lists ---------------------------------------------------------------


def check_dot(dot) -> str | None:
    a, b = numbers(5, seed=1).tolist(), numbers(5, seed=2).tolist()
    return first(
        compare(11, dot([1, 2], [3, 4]), 1e-9, "dot([1, 2], [3, 4])"),
        compare(float(torch.tensor(a) @ torch.tensor(b)), dot(a, b), 1e-6, "on two 5-vectors"),
    )


def check_matvec(matvec) -> str | None:
    M, x = numbers(3, 4, seed=3), numbers(4, seed=4)
    return first(
        compare(
            [17, 39], matvec([[1, 2], [3, 4]], [5, 6]), 1e-9, "matvec([[1, 2], [3, 4]], [5, 6])"
        ),
        compare(M @ x, matvec(M.tolist(), x.tolist()), 1e-6, "a 3x4 matrix times a 4-vector"),
    )


def check_matmul(matmul) -> str | None:
    A, B = numbers(2, 3, seed=5), numbers(3, 4, seed=6)
    return first(
        compare([[11]], matmul([[1, 2]], [[3], [4]]), 1e-9, "matmul([[1, 2]], [[3], [4]])"),
        compare(A @ B, matmul(A.tolist(), B.tolist()), 1e-6, "a 2x3 matrix times a 3x4 one"),
    )


# Chapter 2: token ids and the embedding ------------------------------------------------------


def check_one_hot(one_hot) -> str | None:
    return first(
        compare([0, 0, 1, 0], one_hot(2, 4), 0, "one_hot(2, 4)"),
        compare(F.one_hot(torch.tensor(76), 77), one_hot(76, 77), 0, "one_hot(76, 77)"),
    )


def check_embed(embed) -> str | None:
    model = shakespeare()
    problems = []
    for text in ("ROMEO:", PROMPT):
        _, cache = model.run_with_cache(text, names="blocks.0.hook_resid_pre")
        expected = cache["blocks.0.hook_resid_pre"][0]  # what block 0 reads
        problems.append(compare(expected, embed(model, text), 1e-6, f"embed(model, {text!r})"))
    return first(*problems)


# Chapter 3: one head's attention, against the model's own values ----------------------------


def heads():
    """(where, values) for two heads of the shakespeare model on PROMPT, as the model
    computed them: q, k, v and z [T, d_head], the scores and the pattern [T, T]."""
    _, cache = shakespeare().run_with_cache(PROMPT)
    for layer, head in ((0, 0), (2, 3)):
        values = {name: cache[name, layer][0, :, head] for name in ("q", "k", "v", "z")}
        values |= {name: cache[name, layer][0, head] for name in ("attn_scores", "pattern")}
        yield f"layer {layer} head {head}", {name: v.clone() for name, v in values.items()}


def check_attention_scores(attention_scores) -> str | None:
    return first(
        *(compare(h["attn_scores"], attention_scores(h["q"], h["k"]), 1e-4, where)
          for where, h in heads())
    )  # fmt: skip


def check_attention_pattern(attention_pattern) -> str | None:
    return first(
        *(compare(h["pattern"], attention_pattern(h["attn_scores"]), 1e-6, where)
          for where, h in heads())
    )  # fmt: skip


def check_head_output(head_output) -> str | None:
    return first(
        *(compare(h["z"], head_output(h["pattern"], h["v"]), 1e-5, where) for where, h in heads())
    )


# Chapter 4: softmax and temperature ----------------------------------------------------------


def check_softmax(softmax) -> str | None:
    small, random = torch.tensor([1.0, 2.0, 3.0]), numbers(77, seed=7, scale=3)
    big = torch.tensor([1000.0, 999.0, 998.0])
    got_big = softmax(big.clone())
    hint = ""
    if isinstance(got_big, torch.Tensor) and not torch.isfinite(got_big).all():
        hint = " (exp(1000) is inf: subtract the largest logit first)"
    problem = first(
        compare(torch.softmax(small, -1), softmax(small.clone()), 1e-6, "softmax([1, 2, 3])"),
        compare(torch.softmax(random, -1), softmax(random.clone()), 1e-6, "on 77 logits"),
        compare(torch.softmax(big, -1), got_big, 1e-6, "softmax([1000, 999, 998])"),
    )
    return problem and problem + hint


def check_with_temperature(with_temperature) -> str | None:
    logits = shakespeare()(torch.tensor([shakespeare().tokenizer.encode("ROMEO:")]))[0, -1]
    return first(
        *(
            compare(
                torch.softmax(logits / t, -1),
                with_temperature(logits.clone(), t),
                1e-6,
                f"the model's logits after 'ROMEO:' at temperature {t}",
            )  # fmt: skip
            for t in (0.5, 1.0, 2.0)
        )
    )


def check_greedy_next(greedy_next) -> str | None:
    model = shakespeare()
    problems = []
    for text in ("ROMEO:", "To be, or not to b", "The king"):
        logits = model(torch.tensor([model.tokenizer.encode(text)]))[0, -1]
        expected = model.tokenizer.decode([int(logits.argmax())])
        problems.append(compare(expected, greedy_next(model, text), 0, f"after {text!r}"))
    return first(*problems)


# Chapter 5: LayerNorm, GELU, RMSNorm ---------------------------------------------------------


def check_layer_norm(layer_norm) -> str | None:
    x = numbers(3, 5, 8, seed=8, scale=3) + 1
    gain, bias = numbers(8, seed=9), numbers(8, seed=10)
    expected = F.layer_norm(x, (8,), gain, bias, 1e-5)
    return compare(expected, layer_norm(x.clone(), gain, bias, 1e-5), 1e-5, "x [3, 5, 8]")


def check_gelu(gelu) -> str | None:
    x = torch.linspace(-5, 5, 101)
    return compare(F.gelu(x), gelu(x.clone()), 1e-6, "101 numbers from -5 to 5 (exact GELU)")


def check_rms_norm(rms_norm) -> str | None:
    x, gain = numbers(3, 5, 8, seed=11, scale=3) + 1, numbers(8, seed=12)
    expected = F.rms_norm(x, (8,), gain, 1e-5)
    return compare(expected, rms_norm(x.clone(), gain, 1e-5), 1e-5, "x [3, 5, 8]")


# Chapter 6: unembedding and the logit lens ---------------------------------------------------


def check_unembed(unembed) -> str | None:
    model = shakespeare()
    logits, cache = model.run_with_cache(PROMPT)
    resid = cache["blocks.3.hook_resid_post"][0].clone()  # the stream after the last block
    return compare(logits[0], unembed(model, resid), 1e-4, "the stream after block 3 on PROMPT")


def check_lens_top_tokens(lens_top_tokens) -> str | None:
    model = shakespeare()
    problems = []
    for text in ("ROMEO:", PROMPT):
        top = model.logit_lens(text)[:, -1].argmax(-1)  # [n_layer + 1]
        expected = [model.tokenizer.decode([i]) for i in top.tolist()]
        problems.append(compare(expected, lens_top_tokens(model, text), 0, repr(text)))
    return first(*problems)


# Chapter 7: the loss and a derivative --------------------------------------------------------


def check_cross_entropy(cross_entropy) -> str | None:
    logits = numbers(6, 77, seed=13, scale=4)
    targets = torch.randint(77, (6,), generator=torch.Generator().manual_seed(14))
    expected = F.cross_entropy(logits, targets)
    return compare(expected, cross_entropy(logits.clone(), targets), 1e-5, "6 rows of 77 logits")


def check_slope(slope) -> str | None:
    return first(
        compare(-4, slope(lambda w: (w * 2 - 3) ** 2, 1.0), 1e-6, "(2w - 3)² at w = 1"),
        compare(math.cos(0.5), slope(math.sin, 0.5), 1e-6, "sin at w = 0.5"),
    )


def check_text_loss(text_loss) -> str | None:
    model = shakespeare()
    ids = torch.tensor(model.tokenizer.encode(PROMPT))
    expected = F.cross_entropy(model(ids[None])[0, :-1], ids[1:])
    return compare(expected, text_loss(model, PROMPT), 1e-4, "text_loss(model, PROMPT)")


# Chapter 8: circuits -------------------------------------------------------------------------


def causal_pattern(heads: int, T: int, seed: int) -> torch.Tensor:
    """A made-up attention pattern [heads, T, T]: causal, each row summing to 1."""
    scores = numbers(heads, T, T, seed=seed, scale=2)
    return scores.masked_fill(~torch.ones(T, T, dtype=torch.bool).tril(), -math.inf).softmax(-1)


def check_previous_token_scores(previous_token_scores) -> str | None:
    pattern = causal_pattern(4, 10, seed=15)
    expected = torch.stack([pattern[h].diagonal(-1).mean() for h in range(4)])
    return compare(expected, previous_token_scores(pattern.clone()), 1e-6, "a pattern [4, 10, 10]")


def check_induction_scores(induction_scores) -> str | None:
    n, pattern = 6, causal_pattern(4, 12, seed=16)
    # the diagonal n - 1 below the main one, from row n on: key i - n + 1 for query i
    expected = torch.stack([pattern[h].diagonal(-(n - 1))[1:].mean() for h in range(4)])
    return compare(
        expected, induction_scores(pattern.clone(), n), 1e-6, "a pattern [4, 12, 12], n = 6"
    )


def check_ablated_loss(ablated_loss) -> str | None:
    model = shakespeare()
    ids = torch.tensor(model.tokenizer.encode(PROMPT))
    problems = []
    for layer, head in ((0, 1), (3, 2)):
        keep = torch.ones(model.config.n_head, 1)  # [n_heads, 1]: 0 for the head zeroed
        keep[head] = 0.0
        hook = (f"blocks.{layer}.attn.hook_z", lambda z, name, keep=keep: z * keep)
        logits = model.run_with_hooks(PROMPT, [hook])[0]
        expected = F.cross_entropy(logits[:-1], ids[1:])
        got = ablated_loss(model, PROMPT, layer, head)
        problems.append(compare(expected, got, 1e-4, f"layer {layer} head {head} zeroed"))
    return first(*problems)


EXERCISES: dict[int, list[Exercise]] = {
    1: [Exercise("dot", check_dot), Exercise("matvec", check_matvec),
        Exercise("matmul", check_matmul)],
    2: [Exercise("one_hot", check_one_hot), Exercise("embed", check_embed)],
    3: [Exercise("attention_scores", check_attention_scores),
        Exercise("attention_pattern", check_attention_pattern),
        Exercise("head_output", check_head_output)],
    4: [Exercise("softmax", check_softmax), Exercise("with_temperature", check_with_temperature),
        Exercise("greedy_next", check_greedy_next)],
    5: [Exercise("layer_norm", check_layer_norm), Exercise("gelu", check_gelu),
        Exercise("rms_norm", check_rms_norm)],
    6: [Exercise("unembed", check_unembed), Exercise("lens_top_tokens", check_lens_top_tokens)],
    7: [Exercise("cross_entropy", check_cross_entropy), Exercise("slope", check_slope),
        Exercise("text_loss", check_text_loss)],
    8: [Exercise("previous_token_scores", check_previous_token_scores),
        Exercise("induction_scores", check_induction_scores),
        Exercise("ablated_loss", check_ablated_loss)],
}  # fmt: skip
