"""A bounded load test: 32 requests, 8 at a time, on a server with 4 rows. Some clients hang up
mid-stream and some bodies are malformed; every other answer must arrive whole (equal to
`model.generate`), no row may leak, and /health must still say 200."""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from test_serve import running_server, wait_ready

import tinyformers

REQUESTS, CONCURRENCY = 32, 8


@pytest.fixture(scope="module")
def served(gpt2_small_dir):
    model = tinyformers.load(gpt2_small_dir)
    with running_server(lambda: model, max_batch=4, max_queue=16, context=128) as (url, app):
        wait_ready(url)
        engine = app.state.server.engine
        submitted = []
        submit = engine.submit

        def recording(jobs, emit):  # keeps every sequence, to check each one ended
            seqs = submit(jobs, emit)
            submitted.extend(seqs)
            return seqs

        engine.submit = recording
        yield url, engine, submitted


def one(url: str, i: int):
    """Request i: what kind it was and what came back."""
    kind = ("stream", "stream", "whole", "hang-up", "stream-n2", "bad-json", "bad-field", "whole")
    kind = kind[i % 8]
    body = {"prompt": f"Request number {i}", "max_tokens": 6 + i % 7, "temperature": 0}
    if kind == "bad-json":
        response = httpx.post(f"{url}/v1/completions", content=b'{"prompt": "x",', timeout=60)
        return kind, body, response.status_code, response.json()
    if kind == "bad-field":
        response = httpx.post(f"{url}/v1/completions", json={**body, "n": "two"}, timeout=60)
        return kind, body, response.status_code, response.json()
    if kind == "whole":
        response = httpx.post(f"{url}/v1/completions", json=body, timeout=60)
        return kind, body, response.status_code, [response.json()["choices"][0]["text"]]
    n = 2 if kind == "stream-n2" else 1
    body = {**body, "stream": True, "n": n}
    if kind == "hang-up":
        body["max_tokens"] = 100
    texts = [""] * n
    with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=60) as response:
        for line in response.iter_lines():
            if kind == "hang-up":
                break  # the client goes away after the first event
            if line.startswith("data: {"):
                choice = json.loads(line[6:])["choices"][0]
                texts[choice["index"]] += choice["text"]
    return kind, body, response.status_code, texts


def test_32_requests_8_at_a_time_lose_nothing_and_leak_no_row(served, gpt2_small_dir):
    url, engine, submitted = served
    with ThreadPoolExecutor(CONCURRENCY) as pool:
        results = list(pool.map(lambda i: one(url, i), range(REQUESTS)))
    reference = tinyformers.load(gpt2_small_dir)
    for kind, body, status, answer in results:
        if kind.startswith("bad"):
            assert status == 400 and set(answer["error"]) == {"message", "type", "param", "code"}
            continue
        assert status == 200
        if kind != "hang-up":
            expected = reference.generate(body["prompt"], body["max_tokens"], temperature=0)
            assert answer == [expected] * len(answer), body
    # every hung-up request stopped early; every row and queue place is free again
    assert len(submitted) == REQUESTS // 8 * 7  # per 8: 5 with one job, stream-n2 two, bad none
    hung_up = [s for s in submitted if s.request.max_new_tokens == 100]
    assert len(hung_up) == REQUESTS // 8
    for seq in hung_up:
        assert seq.cancelled and seq.generated < 100
    assert engine.running() == 0 and not engine.waiting
    assert httpx.get(f"{url}/health").status_code == 200


def test_a_client_gone_before_a_whole_answer_frees_its_row(served):
    url, engine, submitted = served
    body = {"prompt": "A long answer", "max_tokens": 120, "temperature": 0}
    with pytest.raises(httpx.ReadTimeout):  # the client gives up and closes the connection
        httpx.post(f"{url}/v1/completions", json=body, timeout=httpx.Timeout(60, read=0.3))
    seq = submitted[-1]
    deadline = time.monotonic() + 10
    while engine.running():
        assert time.monotonic() < deadline, "the row was not freed"
        time.sleep(0.01)
    assert seq.cancelled and 0 < seq.generated < 120
