"""The lab's routes, on any FastAPI app: `tinyformers lab` serves them alone, `tinyformers
serve` beside OpenAI's API.

    GET  /lab                the page (static/index.html; its script and style beside it)
    GET  /lab/api/model      the model's name, layers, heads, limits and each view's links
    POST /lab/api/run        {"prompt"} -> tokens, embeddings, patterns, logit lens, logits
    POST /lab/api/ablate     {"prompt", "layer", "head"} -> the logits with that head zeroed
    GET  /lab/code/FILE      one of our .py files, its lines numbered (#L12)
    GET  /lab/learn/NAME     a chapter of the course (docs/learn/), in a checkout

Every refusal is a one-line {"error": "..."} with a 4xx status; the model's work runs in a
thread, so the server keeps answering while it computes.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import (
    FileResponse,
    HTMLResponse,
    JSONResponse,
    PlainTextResponse,
    RedirectResponse,
    Response,
)
from fastapi.staticfiles import StaticFiles
from starlette.concurrency import run_in_threadpool

from tinyformers.lab.compute import Lab, LabError
from tinyformers.lab.links import chapter, source_page

log = logging.getLogger("tinyformers.lab")

STATIC = Path(__file__).resolve().parent / "static"
MAX_BODY = 64 * 2**10  # bytes of a request body: a prompt of MAX_CHARS fits many times over


class LabHost:
    """The Lab, built on first use from the model `get_model()` returns (None while it
    loads), its runs taking turns on `lock` (under `serve`, the lock of the copy of the model
    that /v1/embeddings also runs)."""

    def __init__(self, get_model: Callable, lock: threading.Lock | None) -> None:
        self.get_model, self.model_lock = get_model, lock or threading.Lock()
        self.lab: Lab | None = None
        self.lock = threading.Lock()

    def get(self) -> Lab:
        with self.lock:
            if self.lab is None:
                model = self.get_model()
                if model is None:
                    raise LabError("the model is loading; try again in a moment", 503)
                self.lab = Lab(model, self.model_lock)
            return self.lab


def add_lab(
    app: FastAPI,
    get_model: Callable,
    authorized: Callable[[Request], None] = lambda request: None,
    lock: threading.Lock | None = None,
) -> None:
    """Mount the lab on `app`. `get_model()` returns the LanguageModel (None while it loads);
    `authorized(request)` raises when the API wants a key the request lacks; `lock`, held
    around each run, is shared with whatever else runs that model with hooks."""
    host = app.state.lab = LabHost(get_model, lock)  # app.state.lab: for tests
    app.mount("/lab/static", StaticFiles(directory=STATIC), name="lab-static")

    @app.get("/lab", include_in_schema=False)
    async def page():
        return FileResponse(STATIC / "index.html")

    @app.get("/lab/api/model")
    async def model(request: Request):
        authorized(request)
        return await answer(lambda: host.get().describe())

    @app.post("/lab/api/run")
    async def run(request: Request):
        authorized(request)
        return await answer(lambda body: host.get().run(field(body, "prompt")), request)

    @app.post("/lab/api/ablate")
    async def ablate(request: Request):
        authorized(request)
        names = ("prompt", "layer", "head")
        return await answer(
            lambda body: host.get().ablate(*(field(body, n) for n in names)), request
        )

    @app.get("/lab/code/{path:path}", include_in_schema=False)
    async def code(path: str):
        page = source_page(path)
        if page is None:
            return PlainTextResponse(f"{path}: not a .py file of tinyformers", 404)
        return HTMLResponse(page)

    @app.get("/lab/learn/{name}", include_in_schema=False)
    async def learn(name: str):
        text = chapter(name)
        if text is None:
            return PlainTextResponse(
                f"docs/learn/{name}: not here (the course is in the repository's docs/learn/, "
                "not in an installed package)",
                404,
            )
        return PlainTextResponse(text)  # Markdown reads well as it is


async def answer(compute: Callable, request: Request | None = None) -> Response:
    """`compute()`, or `compute(body)` with the request's JSON body, run in a thread (the
    JSON too: a megabyte of it takes a while); a refusal or a failure as one line."""
    try:
        if request is None:
            content = await run_in_threadpool(lambda: json.dumps(compute(), allow_nan=False))
        else:
            body = await read_body(request)
            content = await run_in_threadpool(lambda: json.dumps(compute(body), allow_nan=False))
    except LabError as e:
        return error(str(e), e.status)
    except Exception:  # a bug or out of memory: logged in full, one line to the page
        log.exception("the lab failed")
        return error("internal error in the lab (the server's log has the traceback)", 500)
    return Response(content, media_type="application/json")


async def read_body(request: Request) -> dict:
    """The body as a JSON object, at most MAX_BODY bytes, or a LabError."""
    size, chunks = 0, []
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_BODY:
            raise LabError(f"the request body is over {MAX_BODY} bytes", 413)
        chunks.append(chunk)
    try:
        body = json.loads(b"".join(chunks))
    except ValueError as e:  # UnicodeDecodeError included
        raise LabError(f"the body is not JSON: {e}") from None
    if not isinstance(body, dict):
        raise LabError('the body must be a JSON object, e.g. {"prompt": "Hello"}')
    return body


def field(body: dict, name: str):
    if name not in body:
        raise LabError(f"{name}: missing")
    return body[name]


def error(message: str, status: int) -> JSONResponse:
    return JSONResponse({"error": message}, status)


def create_app(model) -> FastAPI:
    """The app of `tinyformers lab`: the lab alone on a loaded model, `/` leading to it."""
    app = FastAPI(openapi_url=None, docs_url=None, redoc_url=None)  # the docs pages use a CDN
    add_lab(app, lambda: model)

    @app.get("/", include_in_schema=False)
    async def home():
        return RedirectResponse("/lab")

    return app
