"""Autoregressive generation on a model's static KV cache: prefill once, then one token a step.

The model only maps ids to logits. Here: left-padding a batch, the decode loop (one host sync a
step), per-row stopping on EOS ids and on stop strings, and text deltas for streaming.
"""

from __future__ import annotations

import time
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import nn

from tinyformers.errors import ParameterError
from tinyformers.generation.params import MAX_STOP
from tinyformers.generation.sampling import SamplingParams, next_tokens


@dataclass
class GenerationStats:
    """What `--verbose` reports: prefill, compile warm-up and decode, each timed apart."""

    prompt_tokens: int = 0  # of the longest prompt in the batch
    new_tokens: int = 0  # steps taken
    prefill_seconds: float = 0.0  # prompt forward + the first token
    warmup_seconds: float = 0.0  # a compiled decode's first step, where torch.compile compiles
    decode_seconds: float = 0.0  # every later step

    @property
    def decode_tokens_per_second(self) -> float:
        steps = self.new_tokens - 1 - (self.warmup_seconds > 0)  # the warm-up step not counted
        return steps / self.decode_seconds if self.decode_seconds else 0.0


# Compiled decode steps that already ran once: their first step no longer compiles.
_WARM: weakref.WeakSet = weakref.WeakSet()


@torch.inference_mode()
def generate_tokens(
    net: nn.Module,
    prompts: list[list[int]],
    max_new_tokens: int,
    params: SamplingParams,
    eos_ids: set[int],
    done: list[bool] | None = None,
    stats: GenerationStats | None = None,
    decode: Callable | None = None,
) -> Iterator[list[int | None]]:
    """Each step's new token per row; None for a row that finished before this step.

    A row finishes on one of `eos_ids` (the EOS token is still yielded) or when the caller sets
    `done[row]` (a stop string). Generation ends when every row is done or after max_new_tokens.
    `decode` runs the one-token steps in place of `net` (the net under torch.compile).
    """
    device = next(net.parameters()).device
    B, T = len(prompts), max(len(p) for p in prompts)
    total = T + max_new_tokens
    done = done if done is not None else [False] * B
    ids = torch.zeros(B, T, dtype=torch.long)
    mask = torch.ones(B, total, dtype=torch.long)  # 1 = real token; slots past T fill as we go
    # The ids seen so far, for the repetition penalty; padding repeats a real token of its row.
    history = torch.zeros(B, total, dtype=torch.long)
    for row, prompt in enumerate(prompts):
        pad = T - len(prompt)
        ids[row, pad:] = torch.tensor(prompt)
        mask[row, :pad] = 0
        history[row] = prompt[0]
        history[row, pad:T] = ids[row, pad:]
    ids, mask, history = ids.to(device), mask.to(device), history.to(device)
    generator = None
    if params.seed is not None and not params.greedy:
        generator = torch.Generator(device).manual_seed(params.seed)

    stats = stats if stats is not None else GenerationStats()
    stats.prompt_tokens, start = T, time.perf_counter()
    step_net = net if decode is None else decode
    warming = decode is not None and decode not in _WARM
    cache = net.make_cache(B, total)
    logits = net(ids, mask, cache=cache, input_pos=torch.arange(T, device=device), last_only=True)
    for step in range(max_new_tokens):
        token = next_tokens(logits[:, -1], params, history[:, : T + step], generator)  # (B,)
        history[:, T + step] = token
        tokens = token.tolist()  # the one host sync of the step
        now = time.perf_counter()
        if step == 0:
            stats.prefill_seconds = now - start
        elif step == 1 and warming:
            stats.warmup_seconds = now - start - stats.prefill_seconds
            _WARM.add(decode)
        else:
            stats.decode_seconds = now - start - stats.prefill_seconds - stats.warmup_seconds
        stats.new_tokens = step + 1
        yield [None if done[row] else t for row, t in enumerate(tokens)]
        for row, t in enumerate(tokens):
            done[row] = done[row] or t in eos_ids
        if all(done) or step == max_new_tokens - 1:
            return
        input_pos = torch.tensor([T + step], device=device)
        logits = step_net(token[:, None], mask, cache=cache, input_pos=input_pos, last_only=True)


class StopText:
    """The text of one row as its tokens arrive, cut at the first stop string.

    Emits only complete UTF-8 (the tokenizer's incremental decoder) and holds back any tail
    that could still grow into a stop string (vllm #3574), so streamed text never shows one.
    """

    def __init__(self, tokenizer, stop: list[str]) -> None:
        if len(stop) > MAX_STOP:
            raise ParameterError(f"stop: at most {MAX_STOP} stop strings, got {len(stop)}")
        self.decoder = tokenizer.decoder()
        self.stop = [s for s in stop if s]
        self.text = ""  # decoded so far
        self.emitted = 0  # how much of it was handed out
        self.stopped = False

    def add(self, token: int) -> str:
        """Feed one token; the text now safe to show (may be empty)."""
        self.text += self.decoder.feed(token)
        return self._release(final=False)

    def finish(self) -> str:
        """The rest at the end of generation (an incomplete UTF-8 tail becomes U+FFFD)."""
        if not self.stopped:
            self.text += self.decoder.flush()
        return self._release(final=True)

    def _release(self, final: bool) -> str:
        if not self.stopped:
            # An earlier start would have been held back, so search the unreleased text only.
            found = (self.text.find(s, self.emitted) for s in self.stop)
            cut = min((i for i in found if i >= 0), default=-1)
            if cut >= 0:
                self.text, self.stopped = self.text[:cut], True
        end = len(self.text)
        if not (self.stopped or final):
            end -= self._held_back()
        out, self.emitted = self.text[self.emitted : end], max(self.emitted, end)
        return out

    def _held_back(self) -> int:
        """Length of the longest tail of the text that is a proper prefix of a stop string."""
        longest = 0
        for s in self.stop:
            for n in range(min(len(s) - 1, len(self.text)), longest, -1):
                if self.text.endswith(s[:n]):
                    longest = n
                    break
        return longest


def stream_text(
    net: nn.Module,
    tokenizer,
    prompts: list[list[int]],
    max_new_tokens: int,
    params: SamplingParams,
    eos_ids: set[int],
    stop: list[str],
    stats: GenerationStats | None = None,
    decode: Callable | None = None,
) -> Iterator[tuple[int, str]]:
    """(row, text delta) as tokens arrive; each row ends on EOS, a stop string or the limit."""
    texts = [StopText(tokenizer, stop) for _ in prompts]
    done = [False] * len(prompts)
    steps = generate_tokens(net, prompts, max_new_tokens, params, eos_ids, done, stats, decode)
    for tokens in steps:
        for row, token in enumerate(tokens):
            if token is None or token in eos_ids:
                continue
            if delta := texts[row].add(token):
                yield row, delta
            done[row] = texts[row].stopped
    for row, text in enumerate(texts):
        if delta := text.finish():
            yield row, delta
