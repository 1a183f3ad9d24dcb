"""The server's SSE wire format read raw with httpx, and a failure in the middle of a stream."""

from __future__ import annotations

import contextlib
import json

import httpx
import openai
import pytest
from test_serve import running_server, wait_ready

import tinyformers


def sse(url: str, body: dict) -> list[str]:
    """The `data:` payloads of a streamed answer, in order."""
    with httpx.stream("POST", url, json=body, timeout=60) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        text = response.read().decode()
    events = text.split("\n\n")
    assert events[-1] == ""  # every event ends with a blank line
    assert all(e.startswith("data: ") for e in events[:-1])
    return [e.removeprefix("data: ") for e in events[:-1]]


@pytest.fixture(scope="module")
def served(gpt2_small_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("gpt2-chat-sse")
    for f in gpt2_small_dir.iterdir():
        (folder / f.name).symlink_to(f)
    (folder / "chat_template.jinja").write_text(
        "{% for m in messages %}{{ m.content }}{% endfor %}"
    )
    model = tinyformers.load(folder)
    with running_server(lambda: model, max_batch=4, context=128) as (url, _):
        wait_ready(url)
        yield url, model


def test_chat_stream_wire_format_with_usage(served):
    url, _ = served
    body = {
        "messages": [{"role": "user", "content": "Hello"}],
        "max_tokens": 5,
        "n": 2,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    events = sse(f"{url}/v1/chat/completions", body)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert len({c["id"] for c in chunks}) == 1  # one id for the whole stream
    assert {c["object"] for c in chunks} == {"chat.completion.chunk"}
    first = {c["choices"][0]["index"]: c["choices"][0]["delta"] for c in chunks[:2]}
    assert first == {0: {"role": "assistant"}, 1: {"role": "assistant"}}
    finishes = [
        (c["choices"][0]["index"], c["choices"][0]["finish_reason"])
        for c in chunks
        if c["choices"] and c["choices"][0]["finish_reason"]
    ]
    assert sorted(finishes) == [(0, "length"), (1, "length")]  # exactly one per choice
    usage = chunks[-1]  # just before [DONE], with no choices
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == 10
    assert all(c["usage"] is None for c in chunks[:-1])


def test_completion_stream_without_usage_has_none(served):
    url, model = served
    body = {"prompt": "Hello", "max_tokens": 6, "temperature": 0, "stream": True}
    events = sse(f"{url}/completions", body)  # the route without /v1
    chunks = [json.loads(e) for e in events[:-1]]
    assert events[-1] == "[DONE]" and all("usage" not in c for c in chunks)
    assert {c["object"] for c in chunks} == {"text_completion"}
    assert "".join(c["choices"][0]["text"] for c in chunks) == model.generate(
        "Hello", 6, temperature=0
    )


@contextlib.contextmanager
def third_forward_fails(model):
    """The model's third forward from now (its second decode step) raises."""
    net, forward, calls = model.net, model.net.forward, [0]

    def failing(*args, **kwargs):
        calls[0] += 1
        if calls[0] == 3:
            raise RuntimeError("simulated failure with a secret path /root/x")
        return forward(*args, **kwargs)

    net.forward = failing
    try:
        yield
    finally:
        del net.forward  # the class's forward again


def test_error_mid_stream_is_an_error_event_then_done(served):
    url, model = served
    with third_forward_fails(model):
        body = {"prompt": "Hello", "max_tokens": 20, "temperature": 0, "stream": True}
        events = sse(f"{url}/v1/completions", body)
    assert events[-1] == "[DONE]"
    error = json.loads(events[-2])["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["type"] == "server_error"
    assert "secret" not in events[-2] and "Traceback" not in "".join(events)
    texts = [json.loads(e)["choices"][0]["text"] for e in events[:-2]]
    assert len(texts) == 2  # two tokens came before the failure
    # and the server goes on serving
    answer = httpx.post(f"{url}/v1/completions", json={"prompt": "Hi", "max_tokens": 3}).json()
    assert answer["usage"]["completion_tokens"] == 3


def test_the_openai_client_raises_on_an_error_mid_stream(served):
    url, model = served
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0)
    with third_forward_fails(model), pytest.raises(openai.APIError) as e:
        for _ in client.completions.create(model="x", prompt="Hi", max_tokens=20, stream=True):
            pass
    assert e.value.type == "server_error" and "secret" not in e.value.message


def test_streamed_chat_logprobs_come_with_their_tokens(served):
    url, _ = served
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0)
    messages = [{"role": "user", "content": "Hi"}]
    whole = client.chat.completions.create(
        model="x", messages=messages, max_tokens=8, temperature=0, logprobs=True, top_logprobs=2
    )
    chunks = client.chat.completions.create(
        model="x",
        messages=messages,
        max_tokens=8,
        temperature=0,
        logprobs=True,
        top_logprobs=2,
        stream=True,
    )
    entries = [
        e
        for c in chunks
        if c.choices and c.choices[0].logprobs
        for e in c.choices[0].logprobs.content
    ]
    assert [e.model_dump() for e in entries] == [
        e.model_dump() for e in whole.choices[0].logprobs.content
    ]
