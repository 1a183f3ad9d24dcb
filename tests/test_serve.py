"""`tinyformers serve` through the official `openai` client: answers against `model.generate`,
the client's own parsing of our shapes, and errors as the client's exception classes.

Each server runs in this process on 127.0.0.1, on a free port, started and stopped here; the
model is a 2-layer GPT-2 (real vocab, random weights) with a ChatML template added.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest
import uvicorn

import tinyformers
from tinyformers.chat import encode_chat
from tinyformers.generation.params import SamplingParams
from tinyformers.serve import Settings, create_app

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
NAME = "tiny-gpt2"
DEFAULTS = SamplingParams()  # the server's defaults when a request gives none


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running_server(load, **settings):
    """(base URL, app) of a server on 127.0.0.1 and a free port, stopped on exit."""
    settings.setdefault("name", NAME)
    app = create_app(Settings(**settings), load)
    port = free_port()
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "server did not start"
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}", app
    finally:
        server.should_exit = True
        thread.join(30)
        assert not thread.is_alive()


def wait_ready(url: str) -> None:
    deadline = time.monotonic() + 60
    while httpx.get(f"{url}/health").status_code != 200:
        assert time.monotonic() < deadline, "model did not load"
        time.sleep(0.02)


@pytest.fixture(scope="module")
def chat_dir(gpt2_small_dir, tmp_path_factory) -> Path:
    """The 2-layer GPT-2 folder with a ChatML template (its files linked, not copied)."""
    folder = tmp_path_factory.mktemp("gpt2-chat")
    for f in gpt2_small_dir.iterdir():
        (folder / f.name).symlink_to(f)
    (folder / "chat_template.jinja").write_text(CHATML)
    return folder


@pytest.fixture(scope="module")
def reference(chat_dir):
    """A second copy of the model, for `generate` while the server's copy is busy."""
    return tinyformers.load(chat_dir)


@pytest.fixture(scope="module")
def served(chat_dir):
    model = tinyformers.load(chat_dir)
    with running_server(lambda: model, max_batch=4, context=256) as (url, app):
        wait_ready(url)
        yield url, app


@pytest.fixture
def client(served) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{served[0]}/v1", api_key="unused", max_retries=0)


def chat_ids(model, messages) -> list[int]:
    return encode_chat(model.tokenizer, messages)


def stream_text(model, ids, n, **options) -> str:
    """What `model.stream` gives for prompt ids, with the server's sampling defaults."""
    params = {**DEFAULTS.__dict__, **options}
    return "".join(model.stream(ids, n, **params))


# -- answers ---------------------------------------------------------------------------------


def test_completion_at_temperature_0_equals_generate_streamed_or_not(client, reference):
    prompt = "The capital of France is"
    expected = reference.generate(prompt, 24, temperature=0)
    answer = client.completions.create(model="x", prompt=prompt, max_tokens=24, temperature=0)
    assert answer.choices[0].text == expected
    assert answer.choices[0].finish_reason == "length"
    assert answer.model == NAME  # any name asked for, the served one answers
    n_prompt = len(reference.tokenizer.encode(prompt))
    assert (answer.usage.prompt_tokens, answer.usage.completion_tokens) == (n_prompt, 24)
    assert answer.usage.total_tokens == n_prompt + 24
    stream = client.completions.create(
        model="x", prompt=prompt, max_tokens=24, temperature=0, stream=True
    )
    chunks = list(stream)
    assert "".join(c.choices[0].text for c in chunks) == expected
    assert [c.choices[0].finish_reason for c in chunks].count("length") == 1


def test_chat_at_temperature_0_equals_generate_streamed_or_not(client, reference):
    messages = [
        {"role": "system", "content": "Be brief."},
        {
            "role": "user",
            "content": [{"type": "text", "text": "Hi"}, {"type": "text", "text": "?"}],
        },
    ]
    rendered = [messages[0], {"role": "user", "content": "Hi\n?"}]  # text parts joined
    expected = stream_text(reference, chat_ids(reference, rendered), 20, temperature=0)
    answer = client.chat.completions.create(
        model="x", messages=messages, max_completion_tokens=20, temperature=0
    )
    assert answer.choices[0].message.content == expected
    assert answer.choices[0].message.role == "assistant"
    assert answer.object == "chat.completion" and answer.id.startswith("chatcmpl-")
    stream = client.chat.completions.create(
        model="x", messages=messages, max_tokens=20, temperature=0, stream=True
    )
    joined = "".join(c.choices[0].delta.content or "" for c in stream)
    assert joined == expected


def test_n_seeded_choices_each_equal_generate_with_seed_plus_index(client, reference):
    messages = [{"role": "user", "content": "Tell me a story"}]
    ids = chat_ids(reference, messages)
    answer = client.chat.completions.create(
        model="x", messages=messages, n=3, seed=7, temperature=1.0, max_tokens=16
    )
    assert [c.index for c in answer.choices] == [0, 1, 2]
    for j, choice in enumerate(answer.choices):  # choice j samples with seed + j
        assert choice.message.content == stream_text(
            reference, ids, 16, temperature=1.0, seed=7 + j
        )
    assert answer.usage.completion_tokens == 3 * 16
    assert answer.usage.prompt_tokens == len(ids)  # the prompt counted once


def test_completion_prompt_as_strings_or_token_ids(client, reference):
    ids = reference.tokenizer.encode("Once upon a time")
    answer = client.completions.create(
        model="x", prompt=["Hello world", ids], max_tokens=8, temperature=0, n=2
    )
    texts = [c.text for c in answer.choices]  # index = prompt * n + choice
    hello = reference.generate("Hello world", 8, temperature=0)
    once = reference.generate("Once upon a time", 8, temperature=0)
    assert texts == [hello, hello, once, once]
    assert [c.index for c in answer.choices] == [0, 1, 2, 3]
    single = client.completions.create(model="x", prompt=ids, max_tokens=8, temperature=0)
    assert single.choices[0].text == once


def test_seeded_request_gives_the_same_text_beside_other_requests(client):
    def ask(seed, prompt="A seeded story", tokens=24):
        answer = client.completions.create(
            model="x", prompt=prompt, max_tokens=tokens, seed=seed, temperature=1.0
        )
        return answer.choices[0].text

    alone = ask(11)
    with ThreadPoolExecutor(6) as pool:
        others = [pool.submit(ask, s, f"Other prompt number {s}", 10 + 3 * s) for s in range(5)]
        beside = pool.submit(ask, 11)
        [f.result() for f in others]
        assert beside.result() == alone


def test_stop_string_is_cut_and_never_streamed(client, reference):
    prompt = "The history of"
    full = reference.generate(prompt, 30, temperature=0)
    stop = full[12:16]  # some text from inside the answer, likely across a token boundary
    expected = full[: full.index(stop)]
    answer = client.completions.create(
        model="x", prompt=prompt, max_tokens=30, temperature=0, stop=[stop, "never seen"]
    )
    assert answer.choices[0].text == expected
    assert answer.choices[0].finish_reason == "stop"
    deltas = [
        c.choices[0].text
        for c in client.completions.create(
            model="x", prompt=prompt, max_tokens=30, temperature=0, stop=stop, stream=True
        )
    ]
    assert "".join(deltas) == expected and stop not in "".join(deltas)
    # A stop string that starts in the text but never completes is held back, then released.
    almost = full[12:16] + "\x00"
    answer = client.completions.create(
        model="x", prompt=prompt, max_tokens=30, temperature=0, stop=almost
    )
    assert answer.choices[0].text == full and answer.choices[0].finish_reason == "length"


def test_sixteen_stop_strings_the_last_one_cutting(client, reference):
    prompt = "The history of"
    full = reference.generate(prompt, 30, temperature=0)
    stops = [f"never seen {i}" for i in range(15)] + [full[12:16]]  # HumanEval alone sends 5
    answer = client.completions.create(
        model="x", prompt=prompt, max_tokens=30, temperature=0, stop=stops
    )
    assert answer.choices[0].text == full[: full.index(full[12:16])]
    assert answer.choices[0].finish_reason == "stop"


def test_chat_logprobs_are_the_models_own(client, reference):
    messages = [{"role": "user", "content": "Count"}]
    answer = client.chat.completions.create(
        model="x", messages=messages, max_tokens=6, temperature=0, logprobs=True, top_logprobs=3
    )
    entries = answer.choices[0].logprobs.content
    assert len(entries) == 6
    ids = chat_ids(reference, messages)
    expected = reference([ids])[0, -1].log_softmax(-1)  # the first token's, no cache
    assert entries[0].logprob == pytest.approx(expected.max().item(), abs=1e-4)
    for e in entries:  # greedy: the chosen token is the most likely one
        assert len(e.top_logprobs) == 3
        assert e.token == e.top_logprobs[0].token and e.logprob == e.top_logprobs[0].logprob
        assert e.top_logprobs[0].logprob >= e.top_logprobs[1].logprob >= e.top_logprobs[2].logprob
    joined = b"".join(bytes(e.bytes) for e in entries)
    assert joined.decode("utf-8", "replace") == answer.choices[0].message.content


def test_completion_logprobs_line_up_with_the_text(client):
    answer = client.completions.create(
        model="x", prompt="Hello", max_tokens=8, temperature=0, logprobs=2
    )
    lp, text = answer.choices[0].logprobs, answer.choices[0].text
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.text_offset) == 8
    assert "".join(lp.tokens) == text
    assert lp.text_offset[0] == 0 and lp.text_offset == sorted(lp.text_offset)
    for token, logprob, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs, strict=True):
        assert len(top) <= 2 and max(top.values()) == pytest.approx(logprob)
        assert top[token] == pytest.approx(logprob)


def test_models_routes_and_routes_without_v1(client, served, chat_dir):
    url = served[0]
    models = client.models.list().data
    assert [m.id for m in models] == [NAME]
    assert models[0].model_extra["root"] == str(chat_dir)
    assert client.models.retrieve(NAME).id == NAME
    with pytest.raises(openai.NotFoundError) as e:
        client.models.retrieve("gpt-4")
    assert e.value.code == "model_not_found"
    assert httpx.get(f"{url}/models").json()["data"][0]["id"] == NAME
    body = {"prompt": "Hi", "max_tokens": 2, "temperature": 0}
    assert httpx.post(f"{url}/completions", json=body).json()["usage"]["completion_tokens"] == 2
    assert httpx.get(f"{url}/health").json() == {"status": "ok"}


# -- errors ------------------------------------------------------------------------------------

CHAT = {"model": "x", "messages": [{"role": "user", "content": "Hi"}]}


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"temperature": "hot"}, "temperature"),
        ({"temperature": 2.5}, "temperature"),
        ({"n": 0}, "n"),
        ({"top_p": 0}, "top_p"),
        ({"seed": -1}, "seed"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"top_logprobs": 21, "logprobs": True}, "top_logprobs"),
        ({"top_logprobs": 2}, "top_logprobs"),  # without logprobs
        ({"stop": [str(i) for i in range(17)]}, "stop"),  # at most 16
        ({"stop": 5}, "stop"),
        ({"stream": "yes"}, "stream"),
        ({"tools": [{"type": "function", "function": {"name": "a b"}}]}, "tools[0].function.name"),
        ({"response_format": {"type": "xml"}}, "response_format.type"),
        ({"logit_bias": {"50": 10}}, "logit_bias"),
        ({"frequency_penalty": 0.5}, "frequency_penalty"),
        ({"extra_body": {"echo": True}}, "echo"),  # a completions field
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "tool", "content": "x"}]}, "messages[0].tool_call_id"),
        ({"messages": [{"role": "robot", "content": "x"}]}, "messages[0].role"),
        ({"messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
        (
            {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
            "messages[0].content[0]",
        ),
    ],
)
def test_bad_chat_fields_are_400_naming_the_field(client, fields, param):
    body = {**CHAT, **fields}
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(**body)
    assert e.value.status_code == 400
    assert e.value.param == param and e.value.type == "invalid_request_error"
    assert param.split("[")[0] in e.value.message and "Traceback" not in e.value.message


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"prompt": []}, "prompt"),
        ({"prompt": [1, "a"]}, "prompt"),
        ({"prompt": [50257]}, "prompt"),  # outside the vocabulary
        ({"logprobs": 21}, "logprobs"),
        ({"max_tokens": 0}, "max_tokens"),  # scores a prompt only with echo
        ({"max_tokens": -1, "echo": True}, "max_tokens"),
        ({"best_of": 3}, "best_of"),
        ({"suffix": "end"}, "suffix"),
        ({"prompt": ["a"] * 40, "n": 2}, "prompt"),  # 80 answers, over --max-queue (64)
    ],
)
def test_bad_completion_fields_are_400_naming_the_field(client, fields, param):
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(**{"model": "x", "prompt": "Hi", **fields})
    assert e.value.param == param
    assert e.value.body["message"].count("\n") == 0 and param in e.value.message


def test_prompt_over_the_context_is_400_context_length_exceeded(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="x", prompt="Hi", max_tokens=256, stream=True)
    assert e.value.code == "context_length_exceeded"  # refused before any stream starts
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(
            model="x", messages=[{"role": "user", "content": "a " * 300}]
        )
    assert e.value.code == "context_length_exceeded" and e.value.param == "messages"
    huge = "x" * 100_000  # refused by its length, before tokenizing
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="x", prompt=huge, max_tokens=1)
    assert e.value.code == "context_length_exceeded"


def test_unknown_fields_are_ignored(client, reference):
    answer = client.completions.create(
        model="x",
        prompt="Hi",
        max_tokens=3,
        temperature=0,
        extra_body={"some_new_field": {"a": 1}, "user": "me"},
    )
    assert answer.choices[0].text == reference.generate("Hi", 3, temperature=0)


def test_raw_errors_have_the_openai_shape_and_the_server_keeps_serving(served):
    url = served[0]
    cases = [
        (httpx.post(f"{url}/v1/chat/completions", content=b'{"messages": [}'), 400),
        (httpx.post(f"{url}/v1/chat/completions", content=b"[1, 2]"), 400),
        (httpx.post(f"{url}/v1/completions", content=b"\xff\xfe"), 400),
        (httpx.get(f"{url}/v1/nothing-here"), 404),
        (httpx.get(f"{url}/v1/chat/completions"), 405),
    ]
    for response, status in cases:
        assert response.status_code == status, response.text
        error = response.json()["error"]
        assert set(error) == {"message", "type", "param", "code"}
        assert "Traceback" not in response.text
    assert httpx.get(f"{url}/health").status_code == 200


def test_api_key_is_required_except_on_health(chat_dir):
    model = tinyformers.load(chat_dir)
    with running_server(lambda: model, api_key="sesame", context=64) as (url, _):
        wait_ready(url)
        assert httpx.get(f"{url}/health").status_code == 200
        for key in ("wrong", ""):
            client = openai.OpenAI(base_url=f"{url}/v1", api_key=key or "x", max_retries=0)
            if not key:
                client = client.with_options(default_headers={"Authorization": ""})
            with pytest.raises(openai.AuthenticationError) as e:
                client.models.list()
            assert e.value.type == "authentication_error"
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="sesame", max_retries=0)
        assert client.completions.create(model="x", prompt="Hi", max_tokens=2).usage


def test_health_is_503_while_loading_then_200(chat_dir):
    loaded = threading.Event()

    def slow_load():
        loaded.wait(30)
        return tinyformers.load(chat_dir)

    with running_server(slow_load, context=64) as (url, _):
        response = httpx.get(f"{url}/health")
        assert response.status_code == 503 and response.headers["retry-after"]
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0)
        with pytest.raises(openai.InternalServerError) as e:
            client.completions.create(model="x", prompt="Hi", max_tokens=2)
        assert e.value.status_code == 503 and e.value.code == "model_loading"
        loaded.set()
        wait_ready(url)
        assert client.completions.create(model="x", prompt="Hi", max_tokens=2).usage


def test_full_queue_is_503_with_retry_after(chat_dir):
    model = tinyformers.load(chat_dir)
    with running_server(lambda: model, max_batch=1, max_queue=1, context=256) as (url, app):
        wait_ready(url)
        engine = app.state.server.engine
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0)
        long = {"model": "x", "prompt": "Hi", "max_tokens": 200, "stream": True}
        running, waiting = client.completions.create(**long), client.completions.create(**long)
        next(iter(running))
        assert engine.running() == 1 and len(engine.waiting) == 1
        with pytest.raises(openai.InternalServerError) as e:
            client.completions.create(model="x", prompt="Hi", max_tokens=2)
        assert e.value.status_code == 503 and e.value.code == "queue_full"
        assert e.value.response.headers["retry-after"] == "1"
        running.close()
        waiting.close()
