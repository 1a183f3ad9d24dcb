"""The routes beside OpenAI's chat and completions: the tokenizer's, embeddings, metrics, CORS
and the chat page. The first four answer with and without /v1, as app.py's routes do:

    POST /tokenize           {"prompt"} or {"messages"} -> {"tokens", "count", "max_model_len"}
    POST /detokenize         {"tokens"} -> {"prompt"}
    GET  /tokenizer_info     the tokenizer's class, vocabulary size, special tokens, template
    POST /v1/embeddings      OpenAI's: the mean-pooled, L2-normalised last hidden state
    GET  /metrics            Prometheus's text format (metrics.py); no API key, as vLLM
    GET  /                   the chat page (static/), which talks to /v1/chat/completions

The tokenizer routes take vLLM's shapes, so clients written for vLLM (lm-eval) find them.
"""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from fastapi import FastAPI, Request
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, ConfigDict, Field, field_validator
from starlette.concurrency import run_in_threadpool
from starlette.middleware.cors import CORSMiddleware
from torch import Tensor, nn

from tinyformers.chat import encode_chat
from tinyformers.errors import TinyformersError
from tinyformers.generation.budget import most_chars
from tinyformers.lens import final_norm, listening
from tinyformers.serve.app import Server
from tinyformers.serve.metrics import add_metrics
from tinyformers.serve.protocol import APIError, ChatRequest, check_api_key, parse, read_json
from tinyformers.tokenizers import prompt_ids

STATIC = Path(__file__).resolve().parent / "static"
MAX_INPUTS = 2048  # inputs of one embeddings request, as OpenAI's limit
BATCH_TOKENS = 4096  # padded tokens of one embeddings forward


class _Strict(BaseModel):
    # as protocol.py's bodies: "true" is not a boolean, unknown fields are ignored
    model_config = ConfigDict(extra="ignore", strict=True)


class TokenizeText(_Strict):
    prompt: str
    add_special_tokens: bool = True  # BOS first where the tokenizer's prompts start with one
    return_token_strs: bool = False


class TokenizeChat(_Strict):
    messages: list[Any]  # checked as /v1/chat/completions checks them
    add_generation_prompt: bool = True
    add_special_tokens: bool = False  # the template writes its own special tokens
    return_token_strs: bool = False


# vLLM's chat-tokenize fields that we do not implement: refused, never silently dropped
REFUSED = ("continue_final_message", "chat_template", "chat_template_kwargs", "tools")


class Detokenize(_Strict):
    tokens: list[int]


class Embeddings(_Strict):
    input: Any
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(None, ge=1)

    @field_validator("input")
    @classmethod
    def _input(cls, value) -> list[str | list[int]]:
        """A string, a list of strings, a list of token ids, or a list of such lists."""
        inputs = [value] if isinstance(value, str) or _is_ids(value) else value
        if not isinstance(inputs, list) or not all(
            isinstance(x, str) or _is_ids(x) for x in inputs
        ):
            raise ValueError(
                "expected a string, a list of strings, a list of token ids or a list of such lists"
            )
        if not inputs or any(len(x) == 0 for x in inputs):
            raise ValueError("empty: an embedding needs at least one token")
        if len(inputs) > MAX_INPUTS:
            raise ValueError(f"{len(inputs)} inputs, more than {MAX_INPUTS}")
        return inputs


def _is_ids(value) -> bool:
    return isinstance(value, list) and all(
        isinstance(i, int) and not isinstance(i, bool) for i in value
    )


def add_extras(app: FastAPI, cors_origins: list[str] | None = None) -> None:
    """Add this module's routes, /metrics and the chat page to `create_app`'s app, and CORS
    for `cors_origins` (none: browsers refuse pages of other origins, as before)."""
    server: Server = app.state.server
    embedder = Embedder(server)

    def authorized(request: Request) -> None:  # app.py's check: not /metrics, not the page
        check_api_key(request, server.settings.api_key)

    async def tokenize(request: Request):
        authorized(request)
        engine = server.ready()
        tokenizer = server.model.tokenizer
        body = await read_json(request)
        ids, with_strs = await run_in_threadpool(_tokenize, tokenizer, body)
        strs = [tokenizer.id_to_text(i) for i in ids] if with_strs else None
        context = engine.context
        return {"count": len(ids), "max_model_len": context, "tokens": ids, "token_strs": strs}

    async def detokenize(request: Request):
        authorized(request)
        server.ready()
        tokens = parse(Detokenize, await read_json(request)).tokens
        tokenizer = server.model.tokenizer
        _check_ids(tokens, tokenizer.vocab_size, "tokens")
        return {"prompt": await run_in_threadpool(tokenizer.decode, tokens)}

    async def tokenizer_info(request: Request):
        authorized(request)
        engine = server.ready()
        tokenizer = server.model.tokenizer
        pad = tokenizer.pad_token_id
        info = {
            "tokenizer_class": type(tokenizer).__name__,
            "vocab_size": tokenizer.vocab_size,
            "model_max_length": engine.context,
            "bos_token": tokenizer.bos_token,
            "eos_token": tokenizer.eos_token,
            "pad_token": None if pad is None else tokenizer.id_to_text(pad),
            "add_bos_token": tokenizer.add_bos_token,
        }
        if tokenizer.chat_template is not None:
            info["chat_template"] = tokenizer.chat_template
        return info

    async def embeddings(request: Request):
        authorized(request)
        engine = server.ready()
        body = parse(Embeddings, await read_json(request))
        model = server.model
        width = final_norm(model.net).weight.shape[0]
        if body.dimensions not in (None, width):
            raise APIError(
                400,
                f"dimensions: this model's embeddings have {width}, not {body.dimensions}",
                param="dimensions",
            )
        rows = await run_in_threadpool(_input_ids, model, body.input, engine.context)
        vectors = await run_in_threadpool(embedder, rows)
        data = [
            {"object": "embedding", "index": i, "embedding": _encoded(v, body.encoding_format)}
            for i, v in enumerate(vectors)
        ]
        n = sum(map(len, rows))
        usage = {"prompt_tokens": n, "total_tokens": n}
        return {"object": "list", "data": data, "model": server.settings.name, "usage": usage}

    for prefix in ("/v1", ""):
        app.add_api_route(prefix + "/tokenize", tokenize, methods=["POST"])
        app.add_api_route(prefix + "/detokenize", detokenize, methods=["POST"])
        app.add_api_route(prefix + "/tokenizer_info", tokenizer_info, methods=["GET"])
        app.add_api_route(prefix + "/embeddings", embeddings, methods=["POST"])

    # the page's script and style; not under /chat, where /chat/completions is
    app.mount("/static", StaticFiles(directory=STATIC), name="chat-page")

    @app.get("/", include_in_schema=False)
    async def chat_page():
        return FileResponse(STATIC / "index.html")

    add_metrics(app, lambda: server.engine)
    if cors_origins:  # added last: the outermost layer, so errors carry its headers too
        app.add_middleware(
            CORSMiddleware,
            allow_origins=cors_origins,
            allow_methods=["GET", "POST"],
            allow_headers=["Authorization", "Content-Type"],
        )


def _tokenize(tokenizer, body) -> tuple[list[int], bool]:
    """(ids, whether their texts are asked for) of a /tokenize body: a prompt as
    /v1/completions reads it, or messages as /v1/chat/completions renders them."""
    if not isinstance(body, dict) or "messages" not in body:
        request = parse(TokenizeText, body)
        if request.add_special_tokens:
            return prompt_ids(tokenizer, request.prompt), request.return_token_strs
        return tokenizer.encode(request.prompt), request.return_token_strs
    for name in REFUSED:
        if body.get(name) not in (None, False):
            raise APIError(400, f"{name} is not supported by this server", param=name)
    request = parse(TokenizeChat, body)
    messages = parse(ChatRequest, {"messages": request.messages}).messages
    if tokenizer.chat_template is None:
        raise APIError(400, "messages: this model has no chat template", param="messages")
    try:
        ids = encode_chat(tokenizer, messages, add_generation_prompt=request.add_generation_prompt)
    except TinyformersError as e:  # the template refused the roles or their order
        raise APIError(400, str(e), param="messages") from None
    bos = tokenizer.bos_token_id
    if request.add_special_tokens and tokenizer.add_bos_token and ids[:1] != [bos]:
        ids = [bos, *ids]
    return ids, request.return_token_strs


def _input_ids(model, inputs: list[str | list[int]], context: int) -> list[list[int]]:
    """Each embeddings input as the ids the model reads (strings as /v1/completions reads
    them, ids as given), none longer than the context."""
    rows = []
    for i, x in enumerate(inputs):
        param = "input" if len(inputs) == 1 else f"input[{i}]"
        if isinstance(x, str):
            if len(x) > most_chars(model.tokenizer, context):  # before tokenizing it
                raise APIError(
                    400,
                    f"{param}: {len(x)} characters cannot fit the {context}-token context",
                    param=param,
                    code="context_length_exceeded",
                )
            x = prompt_ids(model.tokenizer, x)
            if not x:  # lone surrogates only, and no BOS to start from
                raise APIError(400, f"{param}: no tokens in this text", param=param)
        _check_ids(x, model.config.vocab_size, param)
        if len(x) > context:
            raise APIError(
                400,
                f"{param}: {len(x)} tokens, more than the {context}-token context",
                param=param,
                code="context_length_exceeded",
            )
        rows.append(x)
    return rows


def _check_ids(ids: list[int], vocab: int, param: str) -> None:
    bad = next((i for i in ids if not 0 <= i < vocab), None)
    if bad is not None:
        raise APIError(400, f"{param}: token id {bad} is outside 0..{vocab - 1}", param=param)


def _encoded(vector: Tensor, encoding_format: str) -> list[float] | str:
    """float: a JSON list; base64: the little-endian float32 bytes (what OpenAI's client asks
    for by default, and decodes with numpy)."""
    if encoding_format == "base64":
        return base64.b64encode(np.asarray(vector, dtype="<f4").tobytes()).decode()
    return vector.tolist()


class Embedder:
    """`embed` on the server's listening copy of the model (Server.listening_copy, which the
    lab also runs): the hooks it listens with live on the model, and the engine generates
    with the server's own meanwhile. One run at a time, on the copy's lock."""

    def __init__(self, server: Server) -> None:
        self.server = server

    def __call__(self, rows: list[list[int]]) -> Tensor:
        with self.server.copy_lock:
            return embed(self.server.listening_copy().net, rows)


def embed(net: nn.Module, rows: list[list[int]]) -> Tensor:
    """[len(rows), width] float32: each row's last hidden state (the final norm's output, what
    HF's `output_hidden_states[-1]` holds and the unembedding reads), averaged over the row's
    tokens and scaled to length 1.

    Rows run in batches of about BATCH_TOKENS padded tokens, sorted by length so the
    padding stays small; left padding with its mask leaves each row what it gives alone.
    """
    out = torch.empty(len(rows), final_norm(net).weight.shape[0])
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]))
    while order:
        n = 1  # rows in this batch: the longest (last) row times n stays within the budget
        while n < len(order) and (n + 1) * len(rows[order[n]]) <= BATCH_TOKENS:
            n += 1
        batch, order = order[:n], order[n:]
        out[batch] = _embed_batch(net, [rows[i] for i in batch])
    return out


def _embed_batch(net: nn.Module, rows: list[list[int]]) -> Tensor:
    device = final_norm(net).weight.device
    T = max(map(len, rows))
    ids = torch.zeros(len(rows), T, dtype=torch.long)  # (B, T); padding id 0, masked
    mask = torch.zeros(len(rows), T, dtype=torch.long)  # (B, T): 1 for real tokens
    for b, row in enumerate(rows):
        ids[b, T - len(row) :] = torch.tensor(row)
        mask[b, T - len(row) :] = 1
    ids, mask = ids.to(device), mask.to(device)
    resid = {}  # the last block's output: each block overwrites the one before

    def keep(name: str, x: Tensor) -> Tensor:
        if name.endswith(".hook_resid_post"):
            resid["last"] = x
        return x

    with torch.inference_mode():
        with listening(net, keep):
            net(ids, mask, last_only=True)  # the logits are not needed: one position's only
        hidden = final_norm(net)(resid["last"]).float()  # (B, T, C)
        # subtle: padding slots hold junk (maybe NaN, which 0 * NaN keeps): select, not multiply
        real = mask.bool()[..., None]  # (B, T, 1)
        pooled = torch.where(real, hidden, 0).sum(1) / mask.sum(1, keepdim=True)  # (B, C)
        return F.normalize(pooled, dim=-1).cpu()
