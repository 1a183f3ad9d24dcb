"""Serve a model over OpenAI's HTTP API, with continuous batching.

Routes (each also without /v1): POST /v1/chat/completions, POST /v1/completions,
GET /v1/models, GET /v1/models/ID, and GET /health (200 when the model is ready, 503 while
it loads). Requests that arrive while others run join the batch at the next decode step.
The sampling flags set the defaults of requests that do not give their own.
"""

from __future__ import annotations

import argparse
import contextlib
import sys

from tinyformers.cli.options import (
    add_model_arguments,
    add_sampling_arguments,
    load_from_args,
    sampling_options,
    typed,
)
from tinyformers.errors import TinyformersError

EXAMPLES = """\
examples:
  tinyformers serve
  tinyformers serve --model ./my-gpt2-folder --port 8080 --api-key secret
  curl 127.0.0.1:8000/v1/chat/completions -d '{"messages": [{"role": "user", "content": "Hi"}]}'
"""


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "serve", help="an OpenAI-compatible HTTP server", description=__doc__, epilog=EXAMPLES
    )
    add_model_arguments(p, compile=False)
    add_sampling_arguments(p, max_new_tokens=None)
    for action in p._actions:
        if action.dest == "max_new_tokens":
            action.help = (
                "max_tokens of a request that gives none (default: chat answers run to the end "
                "of the context, completions stop at 16 as in OpenAI's API)"
            )
    port = typed(int, lambda v: 0 <= v <= 65535, "a port number from 0 to 65535")
    count = typed(int, lambda v: 1 <= v <= 1024, "an integer from 1 to 1024")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on")
    p.add_argument("--port", type=port, default=8000, help="port to listen on")
    p.add_argument("--api-key", help="require `Authorization: Bearer KEY` (not on /health)")
    p.add_argument("--max-batch", type=count, default=8, help="requests decoded together")
    p.add_argument("--max-queue", type=count, default=64, help="requests waiting; more get 503")
    p.add_argument(
        "--context",
        type=typed(int, lambda v: v >= 2, "an integer >= 2"),
        help="tokens per request, prompt and answer (default: the model's, at most 2048); "
        "the KV cache holds --max-batch of them",
    )
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    import uvicorn

    from tinyformers.generation.params import SamplingParams
    from tinyformers.serve import Settings, create_app

    settings = Settings(
        name=args.model or "smollm2",
        api_key=args.api_key,
        max_batch=args.max_batch,
        max_queue=args.max_queue,
        context=args.context,
        max_tokens=args.max_new_tokens,
        sampling=SamplingParams(**sampling_options(args)),
    )

    def on_error(e: Exception) -> None:
        server.should_exit = True  # the error is reported below, once uvicorn has stopped

    def load():
        model = load_from_args(args)
        print(f"serving {settings.name} at http://{args.host}:{args.port}/v1", file=sys.stderr)
        return model

    app = create_app(settings, load, on_error)
    server = uvicorn.Server(uvicorn.Config(app, host=args.host, port=args.port))
    with contextlib.suppress(KeyboardInterrupt):  # uvicorn re-raises the Ctrl-C it shut down on
        server.run()
    error = app.state.server.error
    if error is not None:
        raise error if isinstance(error, TinyformersError) else TinyformersError(str(error))
    return 0
