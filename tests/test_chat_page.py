"""The chat page at / in a real browser: Debian's chromium, driven by Playwright, on
`tinyformers serve` started as a command on a free loopback port, with an API key and
`--cors-origin`, serving the 2-layer GPT-2 of conftest (random weights) with a ChatML template.
What the page streams is checked against the same request through the official `openai`
client at temperature 0: the answer, a stop string's cut, the history of a second turn.

chromium is not optional: without it these tests fail and say how to install it (.ci/run
does, with `apt-get install -y chromium`).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import httpx
import openai
import pytest
from conftest import chromium_page
from test_serve import chat_dir, free_port  # noqa: F401  (chat_dir: a fixture)
from test_serve_cli import wait_for_health

KEY = "sesame"
ORIGIN = "http://page.test"
MAX_TOKENS = 12


@pytest.fixture(scope="module")
def server(chat_dir, tmp_path_factory) -> str:  # noqa: F811
    """The base URL of `tinyformers serve` with TINYFORMERS_API_KEY and --cors-origin."""
    port = free_port()
    log = tmp_path_factory.mktemp("serve") / "stderr.txt"
    command = [sys.executable, "-m", "tinyformers", "serve", "--model", str(chat_dir)]
    command += ["--port", str(port), "--threads", "1", "--context", "256"]
    with log.open("w") as stderr:  # a file, not a pipe: uvicorn logs every request
        process = subprocess.Popen(
            [*command, "--cors-origin", ORIGIN],
            stderr=stderr,
            env={**os.environ, "TINYFORMERS_API_KEY": KEY},
        )
    try:
        wait_for_health(process, port)
        yield f"http://127.0.0.1:{port}"
    finally:
        process.terminate()
        process.wait(30)


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server}/v1", api_key=KEY, max_retries=0)


@pytest.fixture(scope="module")
def page(server, chat_dir, tmp_path_factory):  # noqa: F811
    """The page in chromium, past its API key form: it asks, as the server wants one."""
    with chromium_page(tmp_path_factory.mktemp("chromium-profile")) as (page, errors):
        page.goto(server + "/")
        page.wait_for_function("document.body.dataset.state === 'key'", timeout=30_000)
        assert page.locator("#key-form").is_visible()
        page.locator("#api-key").fill(KEY)
        page.locator("#key-form button").click()
        page.wait_for_function("document.body.dataset.state === 'ready'", timeout=30_000)
        assert page.locator("#key-form").is_hidden()
        assert page.locator("#model").text_content() == str(chat_dir)  # the served name
        yield page
    assert not errors  # no JavaScript error on the way


def settings(page, temperature="0", stop: list[str] = ()) -> None:
    page.locator("#temperature").fill(temperature)
    page.locator("#max-tokens").fill(str(MAX_TOKENS))
    # one stop a line, with --stop's escapes
    lines = [s.replace("\\", "\\\\").replace("\n", "\\n").replace("\t", "\\t") for s in stop]
    page.locator("#stop-strings").fill("\n".join(lines))


def say(page, text: str) -> str:
    """Type `text`, press Enter, wait for the whole answer: the answer's text as shown."""
    answers = page.locator(".message.assistant .content")
    n = answers.count()
    page.locator("#input").fill(text)
    page.locator("#input").press("Enter")
    page.wait_for_function(
        "n => document.querySelectorAll('.message.assistant').length > n"
        " && document.body.dataset.state === 'ready'",
        arg=n,
        timeout=30_000,
    )
    return answers.nth(n).text_content()


def new_chat(page) -> None:
    page.locator("#new").click()
    assert page.locator(".message").count() == 0


def answer(client, messages: list[dict], **options) -> str:
    reply = client.chat.completions.create(
        model="x", messages=messages, temperature=0, max_tokens=MAX_TOKENS, **options
    )
    return reply.choices[0].message.content


def test_the_streamed_answer_equals_the_apis(page, client):
    new_chat(page)
    settings(page)
    # count the answer's updates as they land: a streamed answer grows in several steps
    page.evaluate(
        """() => { window.updates = 0;
        new MutationObserver(() => window.updates++).observe(
            document.getElementById('messages'), {subtree: true, childList: true}); }"""
    )
    with page.expect_request("**/v1/chat/completions") as request:
        shown = say(page, "Hello there")
    body = json.loads(request.value.post_data)
    assert body["stream"] is True and body["temperature"] == 0
    assert body["max_tokens"] == MAX_TOKENS and "stop" not in body
    assert shown == answer(client, [{"role": "user", "content": "Hello there"}])
    assert page.evaluate("window.updates") > 3  # two bubbles, then the deltas
    assert "generated" in page.locator("#status").text_content()  # the usage line


def test_a_stop_string_cuts_the_answer(page, client):
    messages = [{"role": "user", "content": "Tell me more"}]
    full = answer(client, messages)
    assert len(full) > 6
    stop = full[len(full) // 2 : len(full) // 2 + 3]  # some text from inside the answer
    expected = answer(client, messages, stop=[stop])
    assert len(expected) < len(full)
    new_chat(page)
    settings(page, stop=[stop])
    assert say(page, "Tell me more") == expected


def test_a_second_turn_carries_the_history(page, client):
    new_chat(page)
    settings(page)
    first = say(page, "Hi")
    with page.expect_request("**/v1/chat/completions") as request:
        second = say(page, "And then?")
    history = [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": first},
        {"role": "user", "content": "And then?"},
    ]
    assert json.loads(request.value.post_data)["messages"] == history
    assert second == answer(client, history)
    assert page.locator(".message .role").all_text_contents() == ["user", "assistant"] * 2


def test_a_refused_request_shows_the_servers_error_and_gives_the_message_back(page):
    new_chat(page)
    settings(page, temperature="5")  # over OpenAI's 2
    page.locator("#input").fill("Too hot")
    page.locator("#input").press("Enter")
    page.wait_for_function("document.body.dataset.state === 'error'", timeout=30_000)
    assert page.locator("#status").text_content().startswith("temperature:")
    assert page.locator(".message").count() == 0
    assert page.locator("#input").input_value() == "Too hot"


def test_cors_origin_lets_that_origin_call_the_api_and_no_other(server):
    preflight = {"Access-Control-Request-Method": "POST"}
    preflight["Access-Control-Request-Headers"] = "authorization, content-type"
    url = f"{server}/v1/chat/completions"
    allowed = httpx.options(url, headers={"Origin": ORIGIN, **preflight})
    assert allowed.headers["access-control-allow-origin"] == ORIGIN
    other = httpx.options(url, headers={"Origin": "http://other.test", **preflight})
    assert "access-control-allow-origin" not in other.headers
