"""Open the lab: a page in your browser that shows what the model does with a prompt as you
type it.

The tokens; their embedding vectors and nearest tokens; every head's attention (click one);
the logit lens; the next-token probabilities under a temperature slider; and what switching
a head off does to them. Each view links to its chapter of the course and to the lines of
code that compute it. The page and its scripts ship in the package: nothing is fetched from
the network. `tinyformers serve` has the same page at /lab.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import socket

from tinyformers.cli.options import add_model_arguments, load_from_args, typed
from tinyformers.errors import TinyformersError

# The model the lab opens without --model: the small character-level GPT-2 shipped in
# tinyformers/data/shakespeare/ (4 layers of 4 heads: every head fits on the screen).
DEFAULT_MODEL = "shakespeare"

HELP = "a live page that shows inside the model as you type"
EXAMPLES = """\
examples:
  tinyformers lab                                 then open the URL it prints
  tinyformers lab --model smollm2 --port 8001
  tinyformers lab --host 0.0.0.0                  reachable from other machines
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_arguments(p, compile=False)
    for action in p._actions:
        if action.dest == "model":
            action.help = (
                f"checkpoint folder, .gguf file or Hugging Face name (default: {DEFAULT_MODEL})"
            )
    port = typed(int, lambda v: 0 <= v <= 65535, "a port number from 0 to 65535")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on")
    p.add_argument("--port", type=port, default=8000, help="port to listen on (0: any free one)")
    p.set_defaults(model=DEFAULT_MODEL)


def run(args: argparse.Namespace) -> int:
    import uvicorn

    from tinyformers.lab import create_app

    sock = listen(args.host, args.port)  # before loading: a port in use fails at once
    model = load_from_args(args)
    host, port = sock.getsockname()[:2]
    url_host = f"[{host}]" if ":" in host else host
    print(f"the lab is at http://{url_host}:{port}/lab (Ctrl-C stops it)", flush=True)
    server = uvicorn.Server(uvicorn.Config(create_app(model), log_level="warning"))
    with contextlib.suppress(KeyboardInterrupt):  # uvicorn re-raises the Ctrl-C it stopped on
        server.run(sockets=[sock])
    return 0


def listen(host: str, port: int) -> socket.socket:
    """A socket bound before uvicorn starts, so the URL printed is the real one (--port 0)
    and a port in use is one line, not a traceback."""
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
    except socket.gaierror as e:
        raise TinyformersError(f"--host {host}: {e.strerror}") from None
    try:
        return socket.create_server((host, port), family=family)
    except OSError as e:  # os.strerror: Python's own text adds "(while attempting to bind ...)"
        raise TinyformersError(f"cannot listen on {host}:{port}: {os.strerror(e.errno)}") from None
