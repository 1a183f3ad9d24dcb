"""The HTTP side of `tinyformers serve`: OpenAI's routes on FastAPI, fed by the engine.

A request is checked whole (fields, context, queue room) before any answer starts, so every
one of those errors is a plain HTTP error; once a stream has started, an error is an `error`
event followed by `data: [DONE]`. The model loads in the background: `/health` says 503 until
it is ready.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from tinyformers.errors import TinyformersError
from tinyformers.generation.params import SamplingParams
from tinyformers.lab import add_lab
from tinyformers.serve import guided
from tinyformers.serve.engine import Delta, Engine, Failed, Finished, QueueFull
from tinyformers.serve.protocol import (
    APIError,
    ChatRequest,
    CompletionRequest,
    check_api_key,
    parse,
    read_json,
)
from tinyformers.serve.responses import DONE, Choice, Shapes, event
from tinyformers.serve.translate import COMPLETION_MAX_TOKENS, chat_ids, completion_ids, jobs_of

log = logging.getLogger("tinyformers.serve")

GONE = object()  # the event that says a client disconnected


@dataclass
class Settings:
    """What `tinyformers serve` was started with."""

    name: str  # the model's name in answers and /v1/models
    api_key: str | None = None
    max_batch: int = 8
    max_queue: int = 64
    context: int | None = None  # tokens per request (None: the model's, at most 2048)
    cache_tokens: int | None = None  # the prompt cache's bound (None: max_batch * context)
    max_tokens: int | None = None  # default when a request gives none
    sampling: SamplingParams = SamplingParams()


class Server:
    """The app's state: the model and its engine once loaded, or why loading failed."""

    def __init__(self, settings: Settings, load: Callable, on_error: Callable) -> None:
        self.settings, self.load, self.on_error = settings, load, on_error
        self.model = self.engine = self.error = None
        self.root, self.created = "", 0
        self.copy_lock = threading.Lock()  # held by whoever runs the listening copy
        self._copy, self._copying = None, threading.Lock()

    def listening_copy(self):
        """The one copy of the model for the routes that set hooks (the lab, /v1/embeddings),
        made at the first such request (None while the model loads): the hooks live on the
        model, and the engine generates with `model` meanwhile. Run it holding `copy_lock`."""
        with self._copying:
            if self._copy is None and self.model is not None:
                self._copy = copy.copy(self.model)  # the LanguageModel; its net copied below
                self._copy.net = copy.deepcopy(self.model.net)
            return self._copy

    def start(self) -> None:
        threading.Thread(target=self._load, name="tinyformers-load", daemon=True).start()

    def _load(self) -> None:
        try:
            model = self.load()
            if model.tokenizer is None:
                raise TinyformersError(f"{model.source}: no tokenizer files; the server needs one")
            s = self.settings
            context = min(model.config.context_length, s.context or 2048)
            self.model, self.root, self.created = model, str(model.source), int(time.time())
            # ready from here on
            self.engine = Engine(model, s.max_batch, s.max_queue, context, s.cache_tokens)
        except Exception as e:  # a missing or broken model: the command reports it and exits
            self.error = e
            self.on_error(e)

    def ready(self) -> Engine:
        if self.engine is None:
            raise APIError(
                503,
                "the model is loading",
                "server_error",
                code="model_loading",
                headers={"Retry-After": "1"},
            )
        return self.engine


def create_app(settings: Settings, load: Callable, on_error: Callable = lambda e: None) -> FastAPI:
    """The ASGI app; `load()` returns the LanguageModel, called in a thread at startup;
    `on_error(exception)` is called if it fails."""
    server = Server(settings, load, on_error)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        server.start()
        yield
        if server.engine is not None:
            server.engine.close()

    app = FastAPI(lifespan=lifespan, openapi_url=None)  # no schema pages: OpenAI's API is the doc
    app.state.server = server
    _add_error_handlers(app)

    def authorized(request: Request) -> None:
        check_api_key(request, settings.api_key)

    @app.get("/health")
    async def health():
        if server.engine is None:
            return JSONResponse({"status": "loading"}, 503, headers={"Retry-After": "1"})
        return {"status": "ok"}

    async def models(request: Request):
        authorized(request)
        server.ready()
        return {"object": "list", "data": [_model_entry(server)]}

    async def model(request: Request, model_id: str):
        authorized(request)
        server.ready()
        if model_id != settings.name:
            raise APIError(
                404,
                f"the model {model_id!r} does not exist; this server has {settings.name!r}",
                param="model",
                code="model_not_found",
            )
        return _model_entry(server)

    async def chat(request: Request):
        authorized(request)
        engine = server.ready()
        body = parse(ChatRequest, await read_json(request))
        model = server.model
        plan = guided.plan(body, model.tokenizer)  # the tools, the grammar, what to parse
        ids = await run_in_threadpool(chat_ids, model, plan, engine.context)
        limit = body.max_completion_tokens or body.max_tokens or settings.max_tokens
        jobs = jobs_of(body, [ids], limit, engine.context, settings, "messages")
        if plan.grammar is not None:  # in a thread: the first one reads the vocabulary
            await run_in_threadpool(guided.constrain_jobs, body, plan.grammar, model, jobs)
        shapes = Shapes(True, settings.name, model.tokenizer)
        return await _answer(request, engine, jobs, len(ids), body, shapes, plan)

    async def completions(request: Request):
        authorized(request)
        engine = server.ready()
        body = parse(CompletionRequest, await read_json(request))
        if len(body.prompt) * body.n > engine.max_queue:  # checked before tokenizing them all
            raise APIError(
                400,
                f"prompt: {len(body.prompt)} prompts x {body.n} choices is more than the "
                f"{engine.max_queue} requests this server queues",
                param="prompt",
            )
        model = server.model
        prompts = [
            await run_in_threadpool(completion_ids, model, p, engine.context) for p in body.prompt
        ]
        limit = body.max_tokens
        if limit is None:
            limit = settings.max_tokens or COMPLETION_MAX_TOKENS
        jobs = jobs_of(body, prompts, limit, engine.context, settings, "prompt")
        if (grammar := guided.response_grammar(body.response_format)) is not None:
            await run_in_threadpool(guided.constrain_jobs, body, grammar, model, jobs)
        shapes = Shapes(False, settings.name, model.tokenizer)
        return await _answer(request, engine, jobs, sum(map(len, prompts)), body, shapes)

    for prefix in ("/v1", ""):  # clients configured with or without /v1 both work
        app.add_api_route(prefix + "/models", models, methods=["GET"])
        app.add_api_route(prefix + "/models/{model_id:path}", model, methods=["GET"])
        app.add_api_route(prefix + "/chat/completions", chat, methods=["POST"])
        app.add_api_route(prefix + "/completions", completions, methods=["POST"])
    # The page of `tinyformers lab`, on the listening copy: the engine generates meanwhile.
    add_lab(app, server.listening_copy, authorized, lock=server.copy_lock)
    return app


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def api_error(request, e: APIError):
        return JSONResponse(e.body(), e.status, headers=e.headers)

    @app.exception_handler(HTTPException)
    async def http_error(request, e: HTTPException):  # unknown route, wrong method
        kind = "not_found" if e.status_code == 404 else None
        message = f"{request.method} {request.url.path}: {e.detail}"
        return JSONResponse(APIError(e.status_code, message, code=kind).body(), e.status_code)

    app.add_middleware(InternalErrors)


class InternalErrors:
    """A bug's 500 as the API's JSON error, answered inside the other middleware: Starlette's
    own catch-all sits outside them all, so its 500 went out without CORS headers (a browser
    sees a network error, not the answer) and uncounted by /metrics. The traceback is logged,
    never sent. An error after the answer has started is the stream's own `error` event."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        started = False

        async def send_and_note(message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, send_and_note)
        except Exception:
            if started or scope["type"] != "http":
                raise
            log.exception("internal error in %s %s", scope["method"], scope["path"])
            body = APIError(500, "internal server error", "server_error").body()
            await JSONResponse(body, 500)(scope, receive, send)


def _model_entry(server: Server) -> dict:
    return {
        "id": server.settings.name,
        "object": "model",
        "created": server.created,
        "owned_by": "tinyformers",
        "root": server.root,
    }


async def _answer(
    request: Request, engine: Engine, jobs, prompt_tokens, body, shapes: Shapes, plan=None
):
    """Submit the jobs, then stream the answer or send it whole (tool calls parsed out of the
    text where the plan offers tools)."""
    loop = asyncio.get_running_loop()
    events: asyncio.Queue = asyncio.Queue()

    def emit(index, event):  # called from the engine's thread
        loop.call_soon_threadsafe(events.put_nowait, (index, event))

    try:
        seqs = engine.submit(jobs, emit)
    except QueueFull as e:
        raise APIError(
            503,
            f"too many requests waiting: {e}; retry shortly",
            "server_error",
            code="queue_full",
            headers={"Retry-After": "1"},
        ) from None
    results = _results(events, len(jobs))
    if plan is not None and plan.parse is not None:
        results = guided.parsed(results, plan.parse, plan.names, len(jobs))
    if body.stream:
        usage = bool(body.stream_options and body.stream_options.include_usage)
        stream = _sse(results, shapes, len(jobs), body.n, prompt_tokens, usage)
        return StreamingResponse(
            _cancelling(stream, engine, seqs),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache"},
        )
    watcher = asyncio.create_task(_on_disconnect(request, events))
    try:
        choices = [Choice() for _ in jobs]
        async for index, ev in results:
            if ev is GONE:  # nobody is left to answer
                return Response(status_code=499)  # nginx's "client closed request"
            if isinstance(ev, Failed):
                raise APIError(500, ev.message, "server_error")
            _record(choices[index], ev)
    finally:
        watcher.cancel()
        engine.cancel(seqs)  # a no-op for finished jobs
    logprobs = any(job.logprobs is not None for job in jobs)
    cached = sum(c.cached_tokens for c in choices[:: body.n])  # each prompt's first choice
    return shapes.answer(choices, prompt_tokens, cached, logprobs)


async def _results(events: asyncio.Queue, n: int) -> AsyncIterator:
    """(choice index, event) until every choice has finished or one has failed."""
    open_choices = n
    while open_choices:
        index, ev = await events.get()
        yield index, ev
        if isinstance(ev, Failed) or ev is GONE:
            return
        open_choices -= isinstance(ev, Finished)


def _record(choice: Choice, ev) -> None:
    if isinstance(ev, Delta):
        choice.text += ev.text
        choice.logprobs += ev.logprobs
        choice.tool_calls += ev.tool_calls if isinstance(ev, guided.CallDelta) else []
    elif isinstance(ev, Finished):
        choice.finish_reason, choice.completion_tokens = ev.reason, ev.completion_tokens
        choice.cached_tokens = ev.cached_tokens


async def _sse(results, shapes: Shapes, jobs: int, n: int, prompt_tokens: int, usage: bool):
    """The events of a stream: the role first (chat), deltas, one finish_reason per choice,
    the usage if asked, then [DONE]; `n` choices a prompt."""
    if shapes.chat:
        for index in range(jobs):
            yield shapes.chunk(index, role=True, usage=usage)
    completion_tokens = cached_tokens = 0
    async for index, ev in results:
        if isinstance(ev, Delta):
            calls = ev.tool_calls if isinstance(ev, guided.CallDelta) else None
            text = None if calls and not ev.text else ev.text  # a call's delta: no content
            yield shapes.chunk(index, text, logprobs=ev.logprobs, usage=usage, tool_calls=calls)
        elif isinstance(ev, Finished):
            completion_tokens += ev.completion_tokens
            cached_tokens += ev.cached_tokens if index % n == 0 else 0  # a prompt's first choice
            yield shapes.chunk(index, finish_reason=ev.reason, usage=usage)
        else:
            yield event(APIError(500, ev.message, "server_error").body())
            yield DONE
            return
    if usage:
        yield shapes.usage_chunk(prompt_tokens, completion_tokens, cached_tokens)
    yield DONE


async def _cancelling(stream, engine: Engine, seqs):
    """`stream`, and the jobs cancelled when it ends or the client goes away mid-stream."""
    try:
        async for chunk in stream:
            yield chunk
    finally:
        engine.cancel(seqs)


async def _on_disconnect(request: Request, events: asyncio.Queue) -> None:
    """Tell a non-streamed answer's loop that its client went away (a stream is cancelled by
    Starlette itself)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass
    events.put_nowait((None, GONE))
