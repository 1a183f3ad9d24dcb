"""Constrained decoding (generation/constrain.py) on SmolLM2's real 49,152-token vocabulary.

The sampler here draws from random logits under the mask (seeded): it is a harder test than a
model, which mostly writes likely JSON anyway. Every answer that ends in EOS must parse and
validate against its schema (jsonschema is the reference).
"""

from __future__ import annotations

import json

import jsonschema
import pytest
import torch
from conftest import gemma3_gguf

import tinyformers
from tinyformers.generation import constrain

EOS = 2  # <|im_end|>, SmolLM2's EOS

SCHEMA = {  # every branch bounded, so a random walk ends
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "email": {"type": "string", "format": "email", "maxLength": 20},
        "city": {"enum": ["Paris", "London", "Tokyo"]},
        "tags": {
            "type": "array",
            "items": {"type": "string", "pattern": "^[a-z]{1,5}$"},
            "maxItems": 3,
        },
        "ok": {"type": "boolean"},
        "score": {
            "anyOf": [
                {"type": "null"},
                {"type": "integer", "multipleOf": 5, "maximum": 50, "minimum": -50},
            ]
        },
        "where": {"$ref": "#/$defs/point"},
    },
    "required": ["name", "age", "city", "tags", "ok", "where"],
    "additionalProperties": False,
    "$defs": {
        "point": {
            "type": "object",
            "properties": {"x": {"type": "integer", "minimum": 0, "maximum": 9}},
            "required": ["x"],
            "additionalProperties": False,
        }
    },
}


@pytest.fixture(scope="module")
def tok():
    return tinyformers.load_tokenizer("smollm2")


def sample(tok, grammar, seed: int, n_vocab: int | None = None, limit: int = 300):
    """(text, ended with EOS) of one random walk under `grammar`."""
    n_vocab = n_vocab or tok.vocab_size
    matcher = constrain.Matcher(grammar, tok, n_vocab, {EOS})
    g = torch.Generator().manual_seed(seed)
    ids = []
    for _ in range(limit):
        logits = matcher.mask(torch.randn(1, n_vocab, generator=g))
        token = int(torch.multinomial(logits.softmax(-1), 1, generator=g))
        if token == EOS:
            return tok.decode(ids), True
        matcher.accept(token)
        ids.append(token)
    return tok.decode(ids), False


def test_every_seeded_answer_under_a_schema_validates(tok):
    grammar = constrain.json_schema(SCHEMA)
    constrain.check(grammar, tok, tok.vocab_size, {EOS})
    for seed in range(20):
        text, ended = sample(tok, grammar, seed)
        assert ended, text
        jsonschema.validate(json.loads(text), SCHEMA)


def test_json_object_answers_are_objects(tok):
    grammar = constrain.json_object()
    for seed in range(10):
        text, ended = sample(tok, grammar, seed, limit=60)
        if ended:  # "any object" has no bound; an unfinished walk says nothing
            assert isinstance(json.loads(text), dict)


def test_eos_only_where_the_grammar_may_end(tok):
    matcher = constrain.Matcher(constrain.json_schema({"const": "hi"}), tok, tok.vocab_size, {EOS})
    assert not matcher.allowed()[EOS]  # nothing written yet
    for token in tok.encode('"hi"'):
        matcher.accept(token)
    allowed = matcher.allowed()
    assert matcher.done and allowed[EOS] and allowed.sum() == 1  # complete: only EOS


def test_control_tokens_are_never_text_and_padding_rows_never_allowed(tok):
    n_vocab = tok.vocab_size + 64  # a model whose embedding has padding rows past the tokenizer
    matcher = constrain.Matcher(constrain.json_schema({"type": "string"}), tok, n_vocab, {EOS})
    matcher.accept(tok.encode('"')[0])  # inside a string, where any text may come
    allowed = matcher.allowed()
    assert allowed.shape == (n_vocab,) and allowed[tok.encode("hello")[0]]
    assert not allowed[1] and not allowed[tok.vocab_size :].any()  # <|im_start|>, padding
    masked = matcher.mask(torch.zeros(1, n_vocab))
    assert masked[0, 1] == -torch.inf and masked[0, tok.encode("hello")[0]] == 0


@pytest.mark.parametrize(
    ("schema", "named"),
    [
        ({"type": "array", "uniqueItems": True}, "uniqueItems"),
        ({"type": "array", "contains": {"const": 1}}, "contains"),
        ({"type": "integer", "not": {"const": 3}}, "not"),
        ({"if": {"minimum": 5}, "then": {"multipleOf": 2}}, "if, then"),
        ({"type": "object", "propertyNames": {"pattern": "^a"}}, "propertyNames"),
        ({"type": "object", "dependentRequired": {"a": ["b"]}}, "dependentRequired"),
        ({"oneOf": [{"minimum": 0}, {"maximum": 5}]}, "oneOf"),
        ({"type": "string", "pattern": "(?<=a)b"}, "look-around"),
        ({"type": "wizard"}, "Invalid type: wizard"),
    ],
)
def test_what_cannot_be_enforced_is_refused_in_one_line_naming_it(tok, schema, named):
    with pytest.raises(constrain.GrammarError) as e:
        constrain.check(constrain.json_schema(schema), tok, tok.vocab_size, {EOS})
    assert named in str(e.value) and "\n" not in str(e.value)


def test_a_token_outside_the_grammar_is_refused(tok):
    matcher = constrain.Matcher(constrain.json_object(), tok, tok.vocab_size, {EOS})
    with pytest.raises(constrain.GrammarError, match="breaks the grammar"):
        matcher.accept(tok.encode("hello")[0])


@pytest.mark.slow
def test_a_sentencepiece_vocabulary_works_too():
    """Gemma 3's 262,144 SentencePiece tokens: ▁ as a space, byte tokens as their byte."""
    tok = tinyformers.load_tokenizer(gemma3_gguf())
    schema = {"type": "object", "properties": {"say": {"type": "string", "maxLength": 8}}}
    schema |= {"required": ["say"], "additionalProperties": False}
    eos = tok.eos_token_id
    matcher = constrain.Matcher(constrain.json_schema(schema), tok, tok.vocab_size, {eos})
    g = torch.Generator().manual_seed(0)
    ids = []
    while True:
        logits = matcher.mask(torch.randn(1, tok.vocab_size, generator=g))
        token = int(torch.multinomial(logits.softmax(-1), 1, generator=g))
        if token == eos:
            break
        matcher.accept(token)
        ids.append(token)
    jsonschema.validate(json.loads(tok.decode(ids)), schema)
