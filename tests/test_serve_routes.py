"""`tinyformers serve`'s routes beside chat and completions (serve/extras.py, metrics.py):
/tokenize, /detokenize and /tokenizer_info against the model's own tokenizer and chat
template, /v1/embeddings against HF transformers' last hidden state (mean-pooled over the real
tokens, L2-normalised) within 1e-4, /metrics through prometheus_client's own parser, CORS
preflights, the API key, and every route's errors.

One app in this process (Starlette's TestClient, no port) with an API key and one allowed
origin, serving the 2-layer GPT-2 of conftest (real vocabulary, random weights) with ChatML.
"""

from __future__ import annotations

import base64
import time

import numpy as np
import openai
import pytest
import torch
import torch.nn.functional as F
from prometheus_client.parser import text_string_to_metric_families
from starlette.testclient import TestClient
from test_models import CASES, hf_model, ours
from test_serve import CHATML, chat_dir  # noqa: F401  (chat_dir: a fixture)

import tinyformers
from tinyformers.chat import encode_chat
from tinyformers.serve import Settings, create_app, extras
from tinyformers.serve.extras import add_extras, embed
from tinyformers.serve.metrics import Metrics
from tinyformers.tokenizers import prompt_ids

KEY = "sesame"
AUTH = {"Authorization": f"Bearer {KEY}"}
ORIGIN = "http://allowed.test"
CONTEXT = 256
TEXTS = ["Hello world", " leading space", "naïve café 🙂 — ok", "<|endoftext|> is text", ""]


@pytest.fixture(scope="module")
def model(chat_dir):  # noqa: F811
    return tinyformers.load(chat_dir)


@pytest.fixture(scope="module")
def http(model):
    """A client of the app as `tinyformers serve --api-key sesame --cors-origin ORIGIN` runs it."""
    app = create_app(
        Settings(name="tiny", api_key=KEY, max_batch=2, context=CONTEXT), lambda: model
    )
    add_extras(app, cors_origins=[ORIGIN])
    with TestClient(app, headers=AUTH) as client:
        deadline = time.monotonic() + 60
        while client.get("/health").status_code != 200:
            assert time.monotonic() < deadline, "model did not load"
            time.sleep(0.02)
        yield client


@pytest.fixture(scope="module")
def client(http) -> openai.OpenAI:
    return openai.OpenAI(base_url="http://testserver/v1", api_key=KEY, http_client=http)


def error(response, status: int) -> dict:
    assert response.status_code == status, response.text
    return response.json()["error"]


# -- the tokenizer's routes ------------------------------------------------------------------


@pytest.mark.parametrize("text", TEXTS)
def test_tokenize_gives_the_models_ids_and_detokenize_gives_the_text_back(http, model, text):
    tokenizer = model.tokenizer
    answer = http.post("/tokenize", json={"prompt": text, "return_token_strs": True}).json()
    read = prompt_ids(tokenizer, text)  # what /v1/completions reads: "" is BOS alone
    assert answer == {
        "count": len(read),
        "max_model_len": CONTEXT,
        "tokens": read,
        "token_strs": [tokenizer.id_to_text(i) for i in read],
    }
    ids = tokenizer.encode(text)  # special-token text stays plain text
    assert read == (ids or [tokenizer.bos_token_id])  # GPT-2's prompts start without BOS
    plain = http.post("/v1/tokenize", json={"prompt": text, "add_special_tokens": False}).json()
    assert plain["tokens"] == ids and plain["token_strs"] is None
    assert http.post("/detokenize", json={"tokens": ids}).json() == {"prompt": text}


def test_tokenize_adds_bos_where_the_tokenizer_starts_prompts_with_one(http, model, monkeypatch):
    tokenizer = model.tokenizer
    monkeypatch.setattr(tokenizer, "add_bos_token", True)  # as Gemma's and Llama 2's do
    bos = tokenizer.bos_token_id
    ids = tokenizer.encode("Hello")
    assert http.post("/tokenize", json={"prompt": "Hello"}).json()["tokens"] == [bos, *ids]
    body = {"prompt": "Hello", "add_special_tokens": False}
    assert http.post("/tokenize", json=body).json()["tokens"] == ids


def test_chat_tokenize_gives_what_chat_completions_reads(http, client, model):
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "Hi"}]},
    ]
    rendered = [messages[0], {"role": "user", "content": "Hi"}]
    answer = http.post("/tokenize", json={"messages": messages}).json()
    assert answer["tokens"] == encode_chat(model.tokenizer, rendered)
    chat = client.chat.completions.create(model="x", messages=messages, max_tokens=1)
    assert chat.usage.prompt_tokens == answer["count"]
    body = {"messages": messages, "add_generation_prompt": False}
    without = http.post("/tokenize", json=body).json()["tokens"]
    assert without == encode_chat(model.tokenizer, rendered, add_generation_prompt=False)
    assert len(without) < answer["count"]


def test_tokenizer_info_describes_the_tokenizer(http, model):
    info = http.get("/tokenizer_info").json()
    assert info == {
        "tokenizer_class": "Tokenizer",
        "vocab_size": 50257,
        "model_max_length": CONTEXT,
        "bos_token": "<|endoftext|>",
        "eos_token": "<|endoftext|>",
        "pad_token": None,
        "add_bos_token": False,
        "chat_template": CHATML,
    }


# -- embeddings ------------------------------------------------------------------------------


def hf_embeddings(hf, rows: list[list[int]]) -> torch.Tensor:
    """HF's reference: each row alone, output_hidden_states[-1] averaged and normalised."""
    out = []
    with torch.no_grad():
        for row in rows:
            hidden = hf(torch.tensor([row]), output_hidden_states=True).hidden_states[-1]
            out.append(F.normalize(hidden[0].mean(0), dim=-1))
    return torch.stack(out)


def test_embeddings_equal_hf_mean_pooled_normalised_last_hidden_state(
    http,
    client,
    model,
    chat_dir,  # noqa: F811
):
    from transformers import GPT2LMHeadModel

    hf = GPT2LMHeadModel.from_pretrained(chat_dir).eval()
    texts = [
        "The capital of France is",
        "Hi",
        "A longer text, with more tokens in it than the rest",
    ]
    ids = [model.tokenizer.encode(t) for t in texts]
    expected = hf_embeddings(hf, ids)
    # OpenAI's client asks for base64 unless told, and decodes it; float is a JSON list
    for fmt in (openai.NOT_GIVEN, "float"):
        answer = client.embeddings.create(model="x", input=texts, encoding_format=fmt)
        got = torch.tensor([d.embedding for d in answer.data])
        assert got.shape == (3, 768) and [d.index for d in answer.data] == [0, 1, 2]
        assert (got - expected).abs().max() < 1e-4
    assert answer.usage.prompt_tokens == answer.usage.total_tokens == sum(map(len, ids))
    assert answer.model == "tiny"
    raw = http.post("/v1/embeddings", json={"input": texts, "encoding_format": "base64"}).json()
    little_endian = [np.frombuffer(base64.b64decode(d["embedding"]), "<f4") for d in raw["data"]]
    assert (torch.tensor(np.stack(little_endian)) - expected).abs().max() < 1e-4
    one = client.embeddings.create(model="x", input=texts[0], dimensions=768)
    by_ids = client.embeddings.create(model="x", input=ids[1])
    both = client.embeddings.create(model="x", input=[ids[0], ids[1]])
    assert torch.tensor(one.data[0].embedding).allclose(expected[0], atol=1e-4)
    assert torch.tensor(by_ids.data[0].embedding).allclose(expected[1], atol=1e-4)
    assert torch.tensor([d.embedding for d in both.data]).allclose(expected[:2], atol=1e-4)


@pytest.mark.parametrize("name", ["gpt2", "llama", "qwen2", "gemma3_text"])
def test_embed_equals_hf_for_every_architecture(name, monkeypatch):
    """The final norm's output is HF's hidden_states[-1] in each family; rows of different
    lengths batched (left-padded) give what each gives alone, and so do one-row batches."""
    hf = hf_model(CASES[name])
    net = ours(CASES[name], hf)
    g = torch.Generator().manual_seed(0)
    rows = [torch.randint(0, 96, (n,), generator=g).tolist() for n in (9, 1, 4, 7)]
    expected = hf_embeddings(hf, rows)
    assert (embed(net, rows) - expected).abs().max() < 1e-4
    monkeypatch.setattr(extras, "BATCH_TOKENS", 8)  # every row its own batch
    assert (embed(net, rows) - expected).abs().max() < 1e-4


# -- errors ----------------------------------------------------------------------------------

CHAT = [{"role": "user", "content": "Hi"}]
ERRORS = [  # (route, body, the param named)
    ("/tokenize", {"prompt": 5}, "prompt"),
    ("/tokenize", {}, "prompt"),
    ("/tokenize", {"prompt": "x", "add_special_tokens": "yes"}, "add_special_tokens"),
    ("/tokenize", {"messages": []}, "messages"),
    ("/tokenize", {"messages": [{"role": "wizard", "content": "x"}]}, "messages[0].role"),
    ("/tokenize", {"messages": CHAT, "continue_final_message": True}, "continue_final_message"),
    ("/tokenize", {"messages": CHAT, "chat_template": "{{ 1 }}"}, "chat_template"),
    ("/tokenize", ["Hello"], None),
    ("/detokenize", {"tokens": [50257]}, "tokens"),
    ("/detokenize", {"tokens": [-1]}, "tokens"),
    ("/detokenize", {"tokens": "Hello"}, "tokens"),
    ("/detokenize", {"tokens": [1.5]}, "tokens[0]"),
    ("/detokenize", {"tokens": [True]}, "tokens[0]"),
    ("/v1/embeddings", {"input": ""}, "input"),
    ("/v1/embeddings", {"input": []}, "input"),
    ("/v1/embeddings", {"input": ["a", ""]}, "input"),
    ("/v1/embeddings", {"input": [[]]}, "input"),
    ("/v1/embeddings", {"input": 5}, "input"),
    ("/v1/embeddings", {"input": [1, "a"]}, "input"),
    ("/v1/embeddings", {"input": ["a"] * 2049}, "input"),
    ("/v1/embeddings", {"input": [50257]}, "input"),
    ("/v1/embeddings", {"input": ["a", [3, 50257]]}, "input[1]"),
    ("/v1/embeddings", {"input": "a", "dimensions": 256}, "dimensions"),
    ("/v1/embeddings", {"input": "a", "encoding_format": "int8"}, "encoding_format"),
]


@pytest.mark.parametrize(("route", "body", "param"), ERRORS)
def test_bad_fields_are_400_naming_the_field(http, route, body, param):
    assert error(http.post(route, json=body), 400)["param"] == param


@pytest.mark.parametrize("route", ["/tokenize", "/detokenize", "/v1/embeddings"])
def test_bad_json_is_400_and_a_huge_body_413(http, route):
    assert "not valid JSON" in error(http.post(route, content=b'{"prompt": '), 400)["message"]
    assert error(http.post(route, content=b" " * (8 * 2**20 + 1)), 413)


def test_embeddings_longer_than_the_context_are_400_context_length_exceeded(http):
    for body in ({"input": [1] * (CONTEXT + 1)}, {"input": "word " * (CONTEXT + 1)}):
        e = error(http.post("/v1/embeddings", json=body), 400)
        assert (e["param"], e["code"]) == ("input", "context_length_exceeded")
    huge = {"input": ["short", "x" * (CONTEXT * 200)]}  # refused before it is tokenized
    e = error(http.post("/v1/embeddings", json=huge), 400)
    assert (e["param"], e["code"]) == ("input[1]", "context_length_exceeded")


def test_chat_tokenize_without_a_template_is_400(http, model, monkeypatch):
    monkeypatch.setattr(model.tokenizer, "chat_template", None)
    e = error(http.post("/tokenize", json={"messages": CHAT}), 400)
    assert e["param"] == "messages" and "no chat template" in e["message"]


# -- the API key, CORS, the page ---------------------------------------------------------------

GUARDED = [
    ("POST", "/tokenize"),
    ("POST", "/detokenize"),
    ("GET", "/tokenizer_info"),
    ("POST", "/embeddings"),
]


def test_the_api_key_guards_every_new_route_but_metrics_and_the_page(http):
    for method, route in GUARDED:
        for path in (route, "/v1" + route):
            for auth in ("", "Bearer wrong"):
                response = http.request(method, path, json={}, headers={"Authorization": auth})
                assert error(response, 401)["code"] == "invalid_api_key"
    for open_path in ("/metrics", "/", "/static/chat.js"):
        assert http.get(open_path, headers={"Authorization": ""}).status_code == 200


def test_cors_answers_the_allowed_origin_and_no_other(http):
    preflight = {"Access-Control-Request-Method": "POST"}
    preflight["Access-Control-Request-Headers"] = "authorization, content-type"
    allowed = http.options("/v1/chat/completions", headers={"Origin": ORIGIN, **preflight})
    assert allowed.status_code == 200
    assert allowed.headers["access-control-allow-origin"] == ORIGIN
    assert "authorization" in allowed.headers["access-control-allow-headers"].lower()
    other = http.options(
        "/v1/chat/completions", headers={"Origin": "http://evil.test", **preflight}
    )
    assert other.status_code == 400 and "access-control-allow-origin" not in other.headers
    # the answers themselves, errors too, carry the header a browser needs to read them
    answer = http.get("/tokenizer_info", headers={"Origin": ORIGIN})
    assert answer.headers["access-control-allow-origin"] == ORIGIN
    refused = http.get("/tokenizer_info", headers={"Origin": ORIGIN, "Authorization": ""})
    assert refused.status_code == 401
    assert refused.headers["access-control-allow-origin"] == ORIGIN
    assert "access-control-allow-origin" not in http.get("/v1/models").headers  # no Origin


def test_a_bug_is_a_json_500_that_carries_cors_and_is_counted(http, monkeypatch):
    def broken(net, rows):
        raise RuntimeError("secret detail")

    monkeypatch.setattr(extras, "embed", broken)
    answer = http.post("/v1/embeddings", json={"input": "a"}, headers={"Origin": ORIGIN})
    assert error(answer, 500)["type"] == "server_error" and "secret" not in answer.text
    # Starlette's catch-all answered outside CORS: a browser saw a network error instead
    assert answer.headers["access-control-allow-origin"] == ORIGIN
    counted = http.get("/metrics").text
    assert 'tinyformers_requests_total{route="/v1/embeddings",status="500"} 1.0' in counted


def test_no_cors_origin_no_cors(model):
    app = create_app(Settings(name="tiny"), lambda: model)
    add_extras(app)
    with TestClient(app) as bare:
        headers = {"Origin": ORIGIN, "Access-Control-Request-Method": "POST"}
        preflight = bare.options("/v1/chat/completions", headers=headers)
        assert "access-control-allow-origin" not in preflight.headers


def test_the_chat_page_and_its_files_are_served_and_fetch_nothing_outside(http):
    page = http.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    for name in ("chat.js", "chat.css"):
        assert f'"static/{name}"' in page.text
        assert http.get(f"/static/{name}").status_code == 200
    assert http.get("/chat/completions").status_code == 405  # the page's files are elsewhere
    for f in extras.STATIC.iterdir():
        assert "https://" not in f.read_text() and "http://" not in f.read_text(), f.name


# -- metrics ---------------------------------------------------------------------------------


def scrape(http) -> dict[tuple[str, tuple], float]:
    """Every sample of /metrics, parsed by prometheus_client: {(name, labels): value}."""
    response = http.get("/metrics")
    assert response.headers["content-type"].startswith("text/plain")
    samples = {}
    for family in text_string_to_metric_families(response.text):
        for s in family.samples:
            samples[s.name, tuple(sorted(s.labels.items()))] = s.value
    return samples


def test_metrics_count_requests_tokens_and_latencies(http, client, model):
    before = scrape(http)
    prompt = "Once upon a time"
    client.completions.create(model="x", prompt=prompt, max_tokens=5, temperature=0)
    stream = client.completions.create(
        model="x", prompt=prompt, max_tokens=4, temperature=0, stream=True
    )
    assert len(list(stream)) > 0
    http.get("/tokenizer_info", headers={"Authorization": ""})  # a 401
    after = scrape(http)

    def moved(name, **labels):
        key = (name, tuple(sorted(labels.items())))
        return after.get(key, 0) - before.get(key, 0)

    completions = {"route": "/v1/completions", "status": "200"}
    assert moved("tinyformers_requests_total", **completions) == 2
    assert moved("tinyformers_requests_total", route="/tokenizer_info", status="401") == 1
    n_prompt = len(model.tokenizer.encode(prompt))
    assert moved("tinyformers_prompt_tokens_total") == 2 * n_prompt
    assert moved("tinyformers_generation_tokens_total") == 5 + 4
    assert moved("tinyformers_time_to_first_token_seconds_count") == 2
    assert moved("tinyformers_time_per_output_token_seconds_count") == 2
    assert moved("tinyformers_time_to_first_token_seconds_sum") > 0
    assert after["tinyformers_queue_depth", ()] == 0
    assert after["tinyformers_batch_size", ()] == 0
    assert ("tinyformers_prompt_cache_hit_tokens_total", ()) in after


def test_cache_hits_are_read_from_the_usage_of_answers_and_streams():
    metrics = Metrics(lambda: None)
    usage = b'"usage": {"prompt_tokens": 9, "prompt_tokens_details": {"cached_tokens": %d}}'
    metrics.read_usage(b'{"id": "cmpl-1", ' + usage % 5 + b"}")  # a whole answer
    metrics.read_usage(b'data: {"choices": [], ' + usage % 3 + b"}\n\n")  # a stream's last event
    metrics.read_usage(b'data: {"choices": [{"text": "cached_tokens"}]}\n\n')  # not usage
    assert metrics.registry.get_sample_value("tinyformers_prompt_cache_hit_tokens_total") == 8
