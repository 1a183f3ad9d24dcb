"""The continuous-batching engine alone: rows joining and leaving a running batch give what
`model.generate` gives each prompt alone, and a cancelled request frees its row in one step."""

from __future__ import annotations

import queue
import time

import pytest

import tinyformers
from tinyformers.generation.params import SamplingParams
from tinyformers.serve.engine import Delta, Engine, Failed, Finished, QueueFull, Request

GREEDY = SamplingParams(temperature=0)


@pytest.fixture(scope="module")
def model(gpt2_small_dir):
    return tinyformers.load(gpt2_small_dir)


@pytest.fixture(scope="module")
def reference(gpt2_small_dir):
    return tinyformers.load(gpt2_small_dir)


@pytest.fixture
def engine(model):
    engine = Engine(model, max_batch=3, max_queue=8, context=128)
    yield engine
    engine.close()


class Collector:
    """Events of submitted requests, by index: text so far and the finish."""

    def __init__(self) -> None:
        self.events: queue.Queue = queue.Queue()

    def __call__(self, index, event) -> None:
        self.events.put((index, event))

    def wait(self, n: int) -> tuple[list[str], list[Finished]]:
        texts, finished = [""] * n, [None] * n
        while not all(finished):
            index, event = self.events.get(timeout=60)
            if isinstance(event, Delta):
                texts[index] += event.text
            else:
                finished[index] = event
        return texts, finished


def test_requests_joining_a_running_batch_equal_generate_alone(engine, model, reference):
    prompts = ["Hello", "The longest prompt of them all, by some way", "A", "Why", "Once upon"]
    lengths = [30, 12, 25, 8, 16]
    first, later = Collector(), Collector()
    engine.submit(
        [
            Request(model.tokenizer.encode(p), n, GREEDY)
            for p, n in zip(prompts[:2], lengths[:2], strict=True)
        ],
        first,
    )
    while engine.steps < 3:  # the first two are decoding ...
        time.sleep(0.001)
    # ... when three more arrive: one joins the free row, two wait for rows to free
    engine.submit(
        [
            Request(model.tokenizer.encode(p), n, GREEDY)
            for p, n in zip(prompts[2:], lengths[2:], strict=True)
        ],
        later,
    )
    texts, finished = first.wait(2)
    more, finished_later = later.wait(3)
    for prompt, n, text in zip(prompts, lengths, texts + more, strict=True):
        assert text == reference.generate(prompt, n, temperature=0), prompt
    assert [f.reason for f in finished + finished_later] == ["length"] * 5
    assert [f.completion_tokens for f in finished + finished_later] == lengths
    assert engine.running() == 0


def test_seeded_sampling_is_the_same_alone_or_batched(engine, model, reference):
    params = SamplingParams(temperature=1.0, top_k=0, top_p=1.0, min_p=0, seed=42)
    ids = model.tokenizer.encode("Seeded")
    alone = Collector()
    engine.submit([Request(ids, 20, params)], alone)
    beside = Collector()
    others = [SamplingParams(temperature=0.7, seed=s) for s in (1, 2)]
    engine.submit([Request(ids, 20, params)] + [Request(ids, 15, p) for p in others], beside)
    expected = reference.generate(
        "Seeded", 20, temperature=1.0, top_k=0, top_p=1.0, min_p=0, seed=42
    )
    assert alone.wait(1)[0][0] == expected
    assert beside.wait(3)[0][0] == expected


def test_cancelled_request_frees_its_row_within_one_step(engine, model):
    collector = Collector()
    seqs = engine.submit([Request(model.tokenizer.encode("Hi"), 100, GREEDY)], collector)
    while engine.steps < 2:
        time.sleep(0.001)
    engine.cancel(seqs)
    at_cancel = engine.steps
    deadline = time.monotonic() + 10
    while engine.running():
        assert time.monotonic() < deadline
        time.sleep(0.001)
    time.sleep(0.05)  # an idle engine runs no steps
    assert engine.steps - at_cancel <= 1
    assert seqs[0].generated < 100


def test_full_queue_refuses_all_of_a_request_or_none(model):
    engine = Engine(model, max_batch=1, max_queue=2, context=64)
    try:
        ids = model.tokenizer.encode("Hi")
        held = engine.submit([Request(ids, 50, GREEDY)], Collector())
        while engine.running() == 0:
            time.sleep(0.001)
        with pytest.raises(QueueFull):
            engine.submit([Request(ids, 5, GREEDY)] * 3, Collector())  # 3 choices, room for 2
        assert len(engine.waiting) == 0
        engine.cancel(held)
    finally:
        engine.close()


def test_a_request_longer_than_a_row_is_refused(engine, model):
    with pytest.raises(ValueError, match="does not fit a row of 128 tokens"):
        engine.submit([Request([1] * 100, 29, GREEDY)], Collector())


def test_closing_ends_running_and_waiting_requests_with_an_error(model):
    engine = Engine(model, max_batch=1, max_queue=4, context=128)
    collector = Collector()
    engine.submit([Request(model.tokenizer.encode("Hi"), 100, GREEDY)] * 3, collector)
    while engine.steps < 1:
        time.sleep(0.001)
    engine.close()
    events = []
    while not collector.events.empty():
        events.append(collector.events.get())
    failed = sorted(i for i, e in events if isinstance(e, Failed))
    assert failed == [0, 1, 2]  # the running one and both waiting ones
    assert all("shutting down" in e.message for _, e in events if isinstance(e, Failed))
