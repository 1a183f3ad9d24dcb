"""Continuous batching: one thread owns the model and decodes every running request together.

Each step: drop cancelled requests, admit waiting ones into free rows of one KV cache (each
prompt prefilled alone into its row, from slot 0), then one decode step for all rows, each row
at its own position ([B, 1] input_pos), then sample each row with its own parameters and
generator. A request joins at the next step and leaves as soon as it ends, freeing its row.
A prompt whose first tokens were computed before starts from their keys and values, copied in
from the prompt cache (prompt_cache.py), and prefills only the rest.

Text goes back to the caller through an `emit` callback, as complete UTF-8 with stop strings
held back (`StopText`), so a streamed text never shows part of a character or of a stop string.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from tinyformers.errors import TinyformersError
from tinyformers.generation.constrain import Matcher
from tinyformers.generation.generate import StopText
from tinyformers.generation.params import SamplingParams
from tinyformers.generation.sampling import next_tokens
from tinyformers.serve.prompt_cache import PromptCache

log = logging.getLogger("tinyformers.serve")


@dataclass
class Request:
    """One sequence to generate: a prompt's ids and how to continue it."""

    prompt: list[int]
    max_new_tokens: int
    params: SamplingParams = field(default_factory=SamplingParams)
    stop: list[str] = field(default_factory=list)
    logprobs: int | None = None  # alternatives per token (0: the chosen token's only); None: off
    echo: bool = False  # the prompt's text first (and its tokens' logprobs when `logprobs` is set)
    # the grammar this sequence follows (response_format, a forced tool call): its own matcher
    constraint: Matcher | None = None


@dataclass
class TokenLogprob:
    """A generated token, its log-probability under the model, and the most likely ones."""

    token: int
    logprob: float | None  # None for a prompt's first token: nothing comes before it
    top: list[tuple[int, float]]  # (id, logprob), most likely first
    text_offset: int  # where the token's text starts in the text sent back


@dataclass
class Delta:
    text: str
    logprobs: list[TokenLogprob]  # of the tokens since the last delta (empty when not asked)


@dataclass
class Finished:
    reason: str  # "stop" (EOS or a stop string) or "length" (max_new_tokens)
    completion_tokens: int
    cached_tokens: int = 0  # prompt tokens whose keys and values came from the prompt cache


@dataclass
class Failed:
    message: str


Event = Delta | Finished | Failed


class QueueFull(Exception):
    """More requests are waiting than the engine's `max_queue`."""


class Sequence:
    """A request inside the engine: its row, position, sampler and text so far."""

    def __init__(self, request: Request, emit: Callable[[Event], None], tokenizer, device) -> None:
        self.request = request
        self.emit = emit
        self.cancelled = False  # set by any thread; the engine drops the sequence at its next step
        params = request.params
        self.generator = None
        if params.seed is not None and not params.greedy:
            # subtle: one generator per sequence, so a seeded request draws the same numbers
            # whoever else is in the batch
            self.generator = torch.Generator(device).manual_seed(params.seed)
        self.text = StopText(tokenizer, request.stop)
        n = len(request.prompt) + request.max_new_tokens
        self.history = torch.zeros(1, n, dtype=torch.long, device=device)  # prompt + new ids
        self.history[0, : len(request.prompt)] = torch.tensor(request.prompt)
        self.length = len(request.prompt)  # ids in history
        self.generated = 0
        self.cached = 0  # prompt tokens taken from the prompt cache
        self.echoed = 0  # characters of prompt text sent before the generated text
        self.pending: list[TokenLogprob] = []  # logprobs of tokens whose text is held back
        self.next_token = 0  # the last sampled token, fed at the next decode step


class Engine:
    """A background thread that serves `Request`s on one model with continuous batching.

    Example:
        >>> engine = Engine(tinyformers.load(), max_batch=8)
        >>> engine.submit([Request(ids, 32)], lambda i, event: print(i, event))
    """

    def __init__(
        self,
        model,
        max_batch: int = 8,
        max_queue: int = 64,
        context: int = 2048,
        cache_tokens: int | None = None,
    ):
        """`cache_tokens`: the prompt cache's bound (None: max_batch * context, as many as the
        rows hold; 0: no prompt cache)."""
        self.model = model
        self.max_batch, self.max_queue, self.context = max_batch, max_queue, context
        self.cache = model.net.make_cache(max_batch, context)  # every row's keys and values
        if cache_tokens is None:
            cache_tokens = max_batch * context
        self.prompts = PromptCache(self.cache, cache_tokens) if cache_tokens else None
        self.rows: list[Sequence | None] = [None] * max_batch
        self.waiting: deque[Sequence] = deque()
        self.work = threading.Condition()
        self.closing = False
        self.steps = 0  # decode steps run, for tests and stats
        # Callables watch(requests) -> on_event(index, event), called for every accepted
        # submit and then beside each of its events (the engine's thread): /metrics' feed.
        self.watchers: list[Callable[[list[Request]], Callable[[int, Event], None]]] = []
        self.thread = threading.Thread(target=self._run, name="tinyformers-engine", daemon=True)
        self.thread.start()

    def submit(self, requests: list[Request], emit: Callable[[int, Event], None]) -> list[Sequence]:
        """Queue `requests` (all or none); events arrive as emit(index in requests, event),
        from the engine's thread. Raises QueueFull when the queue has no room for them all."""
        for r in requests:
            if not r.prompt or len(r.prompt) + r.max_new_tokens > self.context:
                raise ValueError(
                    f"prompt of {len(r.prompt)} tokens + {r.max_new_tokens} new tokens does not "
                    f"fit a row of {self.context} tokens"
                )
        device = self.model.device
        watching: list[Callable[[int, Event], None]] = []

        def emit_watched(i: int, event: Event) -> None:
            for on_event in watching:
                on_event(i, event)
            emit(i, event)

        seqs = [
            Sequence(r, lambda e, i=i: emit_watched(i, e), self.model.tokenizer, device)
            for i, r in enumerate(requests)
        ]
        with self.work:
            if self.closing:
                raise QueueFull("the server is shutting down")
            if len(self.waiting) + len(seqs) > self.max_queue:
                raise QueueFull(
                    f"{len(self.waiting)} requests are waiting (at most {self.max_queue})"
                )
            watching.extend(watch(requests) for watch in self.watchers)
            self.waiting.extend(seqs)
            self.work.notify()
        return seqs

    def cancel(self, seqs: list[Sequence]) -> None:
        """Stop these sequences; their rows are free at the next step (no event follows)."""
        for seq in seqs:
            seq.cancelled = True

    def running(self) -> int:
        """Rows in use now."""
        return sum(seq is not None for seq in self.rows)

    def close(self) -> None:
        with self.work:
            self.closing = True
            self.work.notify()
        self.thread.join()

    # -- the engine's thread ----------------------------------------------------------------

    def _run(self) -> None:
        with torch.inference_mode():
            while True:
                with self.work:
                    while not self.closing and not self.waiting and not any(self.rows):
                        self.work.wait()
                    if self.closing:
                        return self._fail_all("the server is shutting down")
                    admitted = self._admit()
                try:
                    for row, seq in admitted:
                        self._start(row, seq)
                    self._decode()
                except Exception:  # a bug or out of memory: fail what runs, keep serving
                    log.exception("generation step failed")
                    self._fail_all("internal error while generating", waiting=False)

    def _fail_all(self, message: str, waiting: bool = True) -> None:
        """End every running sequence (and every waiting one) with a Failed event."""
        failing = [seq for seq in self.rows if seq is not None]
        self.rows = [None] * self.max_batch
        if waiting:
            failing += self.waiting
            self.waiting.clear()
        for seq in failing:
            self._send(seq, Failed(message))

    def _admit(self) -> list[tuple[int, Sequence]]:
        """Free the rows of cancelled sequences, then move waiting ones into free rows."""
        for row, seq in enumerate(self.rows):
            if seq is not None and seq.cancelled:
                self.rows[row] = None
        admitted = []
        for row in range(self.max_batch):
            while self.rows[row] is None and self.waiting:
                seq = self.waiting.popleft()
                if not seq.cancelled:
                    self.rows[row] = seq
                    admitted.append((row, seq))
        return admitted

    def _start(self, row: int, seq: Sequence) -> None:
        """Prefill a newly admitted sequence, send its echo, then its first token."""
        logits = self._prefill(row, seq)  # (1, T - cached, V) or (1, 1, V)
        request = seq.request
        if request.echo:
            self._echo(seq, logits)
        if request.max_new_tokens == 0:  # the prompt scored, nothing generated
            return self._finish(row, seq, "length")
        self._sample(row, seq, logits[:, -1])

    def _prefill(self, row: int, seq: Sequence) -> Tensor:
        """Run the prompt alone into its row of the cache, after whatever prefix of it the
        prompt cache holds: the logits of every prompt position when its logprobs are asked,
        else of the last one."""
        request = seq.request
        prompt = request.prompt
        T = len(prompt)
        every = request.echo and request.logprobs is not None
        if self.prompts is not None and not every:  # scoring needs every position's logits
            seq.cached = self.prompts.load(prompt, row, limit=T - 1)
        start = seq.cached
        ids = torch.tensor([prompt[start:]], device=self.model.device)  # (1, T - start)
        logits = self.model.net(
            ids,
            cache=self._view(slice(row, row + 1), T),
            input_pos=torch.arange(start, T, device=ids.device),
            last_only=not every,
        )
        if self.prompts is not None:
            self.prompts.store(prompt, row)
        return logits

    def _echo(self, seq: Sequence, logits: Tensor) -> None:
        """Send the prompt's text, with its tokens' logprobs when asked (`logits` then holds
        every position's); the generated tokens' offsets follow on from it."""
        request = seq.request
        prompt = request.prompt
        decoder = self.model.tokenizer.decoder()
        text, offsets = "", []
        for token in prompt:
            offsets.append(len(text))
            text += decoder.feed(token)
        text += decoder.flush()
        entries = []
        if request.logprobs is not None:
            entries = _prompt_logprobs(logits[0], prompt, request.logprobs, offsets)
        seq.echoed = len(text)
        self._send(seq, Delta(text, entries))

    def _decode(self) -> None:
        """One token for every running row, each at its own position."""
        active = [(row, seq) for row, seq in enumerate(self.rows) if seq is not None]
        if not active:
            return
        # Rows 0..B-1 run together; a free row among them computes junk that nothing reads.
        B = active[-1][0] + 1
        ids = torch.zeros(B, 1, dtype=torch.long)
        input_pos = torch.zeros(B, 1, dtype=torch.long)  # (B, 1): the slot each token goes to
        for row, seq in active:
            ids[row, 0], input_pos[row, 0] = seq.next_token, seq.length - 1
        # Keys past the furthest row are never attended to: leave them out of the step.
        S = int(input_pos.max()) + 1
        device = self.model.device
        logits = self.model.net(
            ids.to(device),
            cache=self._view(slice(0, B), S),
            input_pos=input_pos.to(device),
            last_only=True,
        )  # (B, 1, V)
        self.steps += 1
        for row, seq in active:
            self._sample(row, seq, logits[row : row + 1, -1])

    def _view(self, rows: slice, length: int) -> list:
        """The cache's `rows` over slots 0..length-1, sharing its memory.

        subtle: `KVCache.rows` indexes its tensors [B, nh, S, hs] with what it is given, so a
        tuple narrows the slots too; attention then reads only the slots some row has filled,
        not the whole context (a step's cost follows the longest running sequence).
        """
        return [c.rows((rows, slice(None), slice(0, length))) for c in self.cache]

    def _sample(self, row: int, seq: Sequence, logits: Tensor) -> None:
        """Draw the row's next token from its logits (1, V) and hand out what it adds."""
        request = seq.request
        history = seq.history[:, : seq.length]
        grammar = request.constraint
        try:
            # what the grammar forbids goes to -inf (EOS too, until the grammar may end)
            allowed = logits if grammar is None else grammar.mask(logits)
            token = int(next_tokens(allowed, request.params, history, seq.generator))
            if grammar is not None and token not in self.model.eos_ids:
                grammar.accept(token)
        except TinyformersError as e:  # NaN logits or a grammar error: this row fails, not others
            self.rows[row] = None
            return self._send(seq, Failed(str(e)))
        seq.history[0, seq.length] = token
        seq.length += 1
        seq.generated += 1
        seq.next_token = token
        if request.logprobs is not None:  # an EOS keeps its entry: evaluations count on it
            offset = seq.echoed + len(seq.text.text)
            seq.pending.append(_logprob(logits, token, request.logprobs, offset))
        if token in self.model.eos_ids:
            return self._finish(row, seq, "stop")
        text = seq.text.add(token)
        if seq.text.stopped:
            return self._finish(row, seq, "stop", text)
        if seq.generated == request.max_new_tokens:
            return self._finish(row, seq, "length", text)
        if text:
            self._send(seq, Delta(text, seq.pending))
            seq.pending = []

    def _finish(self, row: int, seq: Sequence, reason: str, text: str = "") -> None:
        self.rows[row] = None
        if self.prompts is not None:  # the answer too: the next turn of a chat starts with it
            # subtle: the last token sampled was never fed, so its keys and values are not in
            fed = seq.length - (seq.generated > 0)
            self.prompts.store(seq.history[0, :fed].tolist(), row)
        text += seq.text.finish()
        if text or seq.pending:
            self._send(seq, Delta(text, seq.pending))
        self._send(seq, Finished(reason, seq.generated, seq.cached))

    def _send(self, seq: Sequence, event: Event) -> None:
        try:
            seq.emit(event)
        except Exception:  # the caller is gone (its event loop closed): stop generating for it
            log.debug("dropping a sequence whose caller is gone", exc_info=True)
            seq.cancelled = True


def _logprob(logits: Tensor, token: int, top: int, offset: int) -> TokenLogprob:
    """The model's own log-probabilities (before temperature and filters) for `token`."""
    logp = logits[0].float().log_softmax(-1)  # (V,)
    pairs = []
    if top:
        best = logp.topk(top)
        pairs = list(zip(best.indices.tolist(), best.values.tolist(), strict=True))
    return TokenLogprob(token, float(logp[token]), pairs, offset)


def _prompt_logprobs(
    logits: Tensor, prompt: list[int], top: int, offsets: list[int]
) -> list[TokenLogprob]:
    """The prompt's entries from the logits of every prompt position (T, V): position i - 1
    predicts token i, and nothing predicts token 0 (its entry has no logprob)."""
    logits = logits[:-1]  # (T - 1, V): the last position predicts the first new token
    targets = torch.tensor(prompt[1:], device=logits.device)[:, None]  # (T - 1, 1)
    entries = [TokenLogprob(prompt[0], None, [], 0)]
    for first in range(0, len(prompt) - 1, 256):  # 256 rows at a time: (T, V) is large
        logp = logits[first : first + 256].float().log_softmax(-1)  # (n, V)
        chosen = logp.gather(1, targets[first : first + 256])[:, 0].tolist()  # (n,)
        best = logp.topk(top)  # (n, top)
        ids, values = best.indices.tolist(), best.values.tolist()
        for j, logprob in enumerate(chosen):
            i = first + j + 1
            pairs = list(zip(ids[j], values[j], strict=True))
            entries.append(TokenLogprob(prompt[i], logprob, pairs, offsets[i]))
    return entries
