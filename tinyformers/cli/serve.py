"""Serve a model over OpenAI's HTTP API, with continuous batching.

Routes (each also without /v1): POST /v1/chat/completions (tools, response_format),
POST /v1/completions (echo with logprobs for evaluation), GET /v1/models, GET /v1/models/ID,
POST /v1/embeddings, POST /tokenize, POST /detokenize, GET /tokenizer_info, GET /metrics,
GET /health (200 when the model is ready, 503 while it loads), the chat page at / and the
lab at /lab. Requests that arrive while others run join the batch at the next decode step;
a prompt that starts as an earlier one reuses its keys and values (the prompt cache). The
sampling flags set the defaults of requests that do not give their own.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from pathlib import Path

from tinyformers.cli.options import (
    add_model_arguments,
    add_sampling_arguments,
    load_from_args,
    sampling_options,
    typed,
)
from tinyformers.errors import TinyformersError

HELP = "an OpenAI-compatible HTTP server"
EXAMPLES = """\
examples:
  tinyformers serve
  tinyformers serve --model ./my-gpt2-folder --port 8080 --api-key-file ~/.tinyformers-key
  curl 127.0.0.1:8000/v1/chat/completions -d '{"messages": [{"role": "user", "content": "Hi"}]}'
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
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
    p.add_argument(
        "--api-key",
        help="require `Authorization: Bearer KEY` (not on /health); `ps` shows a key given "
        "here: prefer --api-key-file or TINYFORMERS_API_KEY",
    )
    p.add_argument(
        "--api-key-file", type=Path, metavar="FILE", help="the API key, the first line of FILE"
    )
    p.add_argument("--max-batch", type=count, default=8, help="requests decoded together")
    p.add_argument("--max-queue", type=count, default=64, help="requests waiting; more get 503")
    p.add_argument(
        "--context",
        type=typed(int, lambda v: v >= 2, "an integer >= 2"),
        help="tokens per request, prompt and answer (default: the model's, at most 2048); "
        "the KV cache holds --max-batch of them",
    )
    p.add_argument(
        "--cache-tokens",
        type=typed(int, lambda v: v >= 0, "an integer >= 0"),
        metavar="N",
        help="the prompt cache: keys and values of up to N prompt and answer tokens kept for "
        "later requests that start with the same tokens (default: --max-batch x --context, "
        "as many as the rows hold; 0: off)",
    )
    p.add_argument(
        "--cors-origin",
        action="append",
        metavar="ORIGIN",
        help="let browser pages from ORIGIN (http://localhost:3000; * for any) call the API; "
        "repeatable (default: none)",
    )


def api_key(args: argparse.Namespace) -> str | None:
    """The key requests must bear: --api-key, else the first line of --api-key-file, else
    TINYFORMERS_API_KEY (as llama-server reads LLAMA_API_KEY), else none."""
    from tinyformers.loading.json_file import read_bytes

    if args.api_key is not None and args.api_key_file is not None:
        raise TinyformersError("--api-key and --api-key-file: give the key one way")
    if args.api_key_file is not None:
        data = read_bytes(args.api_key_file, TinyformersError, limit=4096)
        try:
            lines = data.decode("utf-8").splitlines()
        except UnicodeDecodeError:
            raise TinyformersError(f"{args.api_key_file}: not UTF-8 text") from None
        key = lines[0].strip() if lines else ""
        if not key:
            raise TinyformersError(f"{args.api_key_file}: the first line holds no key")
        return key
    if args.api_key is not None:
        return args.api_key
    return os.environ.get("TINYFORMERS_API_KEY") or None


def run(args: argparse.Namespace) -> int:
    import uvicorn

    from tinyformers.generation.params import SamplingParams
    from tinyformers.serve import Settings, create_app
    from tinyformers.serve.extras import add_extras

    settings = Settings(
        name=args.model or "smollm2",
        api_key=api_key(args),
        max_batch=args.max_batch,
        max_queue=args.max_queue,
        context=args.context,
        cache_tokens=args.cache_tokens,
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
    add_extras(app, cors_origins=args.cors_origin)
    server = uvicorn.Server(uvicorn.Config(app, host=args.host, port=args.port))
    with contextlib.suppress(KeyboardInterrupt):  # uvicorn re-raises the Ctrl-C it shut down on
        server.run()
    error = app.state.server.error
    if error is not None:
        raise error if isinstance(error, TinyformersError) else TinyformersError(str(error))
    return 0
