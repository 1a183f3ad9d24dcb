"""Structured output on the server through the official `openai` client, on the real SmolLM2:
json_schema answers that always validate (20 seeded), json_object, completions under a
schema, a streamed answer equal to the whole one, and a keyword the engine cannot enforce
refused by name. (The grammar engine alone: test_constrain.py.)
"""

from __future__ import annotations

import json

import jsonschema
import openai
import pytest
from test_serve import running_server, wait_ready

import tinyformers

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "minLength": 1, "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "city": {"enum": ["Paris", "Rome", "Lima"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 8}, "maxItems": 2},
    },
    "required": ["name", "age", "city"],
    "additionalProperties": False,
}
SCHEMA_FORMAT = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}}
ASK = [{"role": "user", "content": "Describe a person as JSON."}]


@pytest.fixture(scope="module")
def client():
    model = tinyformers.load()
    with running_server(lambda: model, name="smollm2", max_batch=4, context=512) as (url, _):
        wait_ready(url)
        yield openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0)


def test_twenty_seeded_json_schema_answers_all_validate(client):
    answers = []
    for seed in range(
        0, 20, 4
    ):  # 5 requests of 4 choices (choice j draws with seed + j): seeds 0-19
        reply = client.chat.completions.create(
            model="x",
            messages=ASK,
            response_format=SCHEMA_FORMAT,
            temperature=1.0,
            seed=seed,
            n=4,
            max_tokens=120,  # a PERSON is at most ~70 tokens: every answer ends by the grammar
        )
        answers += reply.choices
    texts = [c.message.content for c in answers]
    assert len(set(texts)) >= 15, texts  # twenty draws, not one answer twenty times
    for choice in answers:
        assert choice.finish_reason == "stop", choice.message.content
        jsonschema.validate(json.loads(choice.message.content), PERSON)


def test_json_object_answer_is_an_object(client):
    reply = client.chat.completions.create(
        model="x",
        messages=[{"role": "user", "content": "Give me a JSON object."}],
        response_format={"type": "json_object"},
        temperature=0.8,
        seed=3,
        max_tokens=200,
    )
    choice = reply.choices[0]
    if choice.finish_reason == "stop":  # a free-form object may outgrow max_tokens
        assert isinstance(json.loads(choice.message.content), dict)
    else:  # then it is an object's prefix: it opens as one
        assert choice.message.content.lstrip().startswith("{")


def test_completions_take_a_schema_too(client):
    reply = client.completions.create(
        model="x",
        prompt="A person, as JSON:",
        max_tokens=120,
        temperature=0.7,
        seed=1,
        extra_body={"response_format": SCHEMA_FORMAT},
    )
    jsonschema.validate(json.loads(reply.choices[0].text), PERSON)


def test_streamed_schema_answer_equals_the_whole_one(client):
    settings = dict(model="x", messages=ASK, response_format=SCHEMA_FORMAT, temperature=1, seed=11)
    whole = client.chat.completions.create(**settings, max_tokens=120).choices[0].message.content
    stream = client.chat.completions.create(**settings, max_tokens=120, stream=True)
    pieces = [c.choices[0].delta.content or "" for c in stream if c.choices]
    assert "".join(pieces) == whole


@pytest.mark.parametrize(
    ("schema", "words"),
    [
        ({"type": "array", "uniqueItems": True}, "uniqueItems cannot be enforced"),
        (
            {"oneOf": [{"type": "integer"}, {"type": "number"}]},
            "oneOf whose branches overlap cannot be enforced",
        ),
    ],
)
def test_a_keyword_the_engine_cannot_enforce_is_refused_by_name(client, schema, words):
    spec = {"type": "json_schema", "json_schema": {"name": "s", "schema": schema}}
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="x", messages=ASK, response_format=spec)
    error = e.value.response.json()["error"]
    assert error["param"] == "response_format"
    assert error["message"].startswith("response_format.json_schema.schema: ")
    assert words in error["message"] and "\n" not in error["message"]


def test_a_malformed_response_format_names_the_field(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(
            model="x", messages=ASK, response_format={"type": "json_schema"}
        )
    assert e.value.param == "response_format.json_schema"
