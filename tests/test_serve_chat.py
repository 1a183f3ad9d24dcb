"""The server on the real chat model (SmolLM2-135M-Instruct): answers at temperature 0 equal the
model's own generation whether streamed, whole, or beside other requests."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import openai
import pytest
from test_serve import running_server, wait_ready

import tinyformers
from tinyformers.chat import encode_chat

pytestmark = pytest.mark.slow

QUESTIONS = [
    "What is the capital of France?",
    "Name a primary colour.",
    "Say hello in Spanish.",
    "What is 2 + 2?",
]


@pytest.fixture(scope="module")
def served():
    model = tinyformers.load()
    with running_server(lambda: model, name="smollm2", max_batch=4, context=512) as (url, _):
        wait_ready(url)
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0)
        yield client, model


def generated(model, question: str, n: int) -> str:
    """The model's own answer at temperature 0 (called while the server is idle)."""
    ids = encode_chat(model.tokenizer, [{"role": "user", "content": question}])
    out = model.generate_ids(ids, n, temperature=0)
    text = model.tokenizer.decode([t for t in out if t not in model.eos_ids])
    assert text == "".join(model.stream(ids, n, temperature=0))
    return text


def ask(client, question: str, n: int = 24, **options):
    messages = [{"role": "user", "content": question}]
    return client.chat.completions.create(
        model="smollm2", messages=messages, max_tokens=n, temperature=0, **options
    )


def test_greedy_chat_streamed_whole_and_generate_agree(served):
    client, model = served
    expected = generated(model, QUESTIONS[0], 24)
    assert "Paris" in expected
    answer = ask(client, QUESTIONS[0])
    assert answer.choices[0].message.content == expected
    assert answer.choices[0].finish_reason == "stop"  # the model's <|im_end|>, not the limit
    chunks = list(ask(client, QUESTIONS[0], stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == expected


def test_concurrent_chats_each_equal_their_answer_alone(served):
    client, model = served
    alone = [generated(model, q, 24) for q in QUESTIONS]
    with ThreadPoolExecutor(len(QUESTIONS)) as pool:
        answers = list(pool.map(lambda q: ask(client, q).choices[0].message.content, QUESTIONS))
    assert answers == alone


def test_emoji_split_across_tokens_stream_as_whole_characters(served):
    client, model = served
    question = "Reply with three smiley face emoji and nothing else."
    expected = generated(model, question, 12)
    assert any(ord(c) > 0xFFFF for c in expected)  # 4 UTF-8 bytes, over several tokens
    chunks = list(ask(client, question, 12, stream=True, stream_options={"include_usage": True}))
    deltas = [
        c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content
    ]
    assert "".join(deltas) == expected
    assert all("\ufffd" not in d for d in deltas)
    assert len(deltas) < chunks[-1].usage.completion_tokens  # tokens held back mid-character


def test_stop_string_on_a_real_answer(served):
    client, model = served
    answer = ask(client, QUESTIONS[0], stop=["Paris"])
    full = generated(model, QUESTIONS[0], 24)
    assert answer.choices[0].message.content == full[: full.index("Paris")]
    assert answer.choices[0].finish_reason == "stop"
