"""Serving speed: `tinyformers serve` under 1, 4 and 8 concurrent streaming clients, and a
chat that resends its history, with and without the prompt cache.

    python -m benchmarks.serve [--model smollm2] [--clients 1,4,8] [--rounds 2] [--tokens 64]
    python -m benchmarks.serve --turns 10 [--turn-chars 1200] [--tokens 32]
    python -m benchmarks.serve --grammar [--rounds 4] [--tokens 64]
    python -m benchmarks.serve --soak 600 [--clients 8]     # benchmarks/soak.py

The server runs in its own process on 127.0.0.1 (a free port), so the clients here do not
share its interpreter. Each client sends `--rounds` streaming completions one after another
(a story prompt, default sampling with a seed per request, `--tokens` at most). Measured per
level of concurrency: time to first token (request sent -> first text event), the gap between
text events of one stream, both as p50/p99, and total tok/s: completion tokens of every
request (from the usage event) over the wall time of the whole level. The first request of
the run is a warm-up and is not counted.

With `--turns`, one client holds a chat of that many turns, each a new user message of about
300 tokens (`--turn-chars` characters of All's Well, tests/data) answered in `--tokens` tokens
at temperature 0, the whole history sent each turn: time to first token per turn, on a server
with the prompt cache (its default) and then on one started with `--cache-tokens 0`.

With `--grammar`, one client sends `--rounds` free-text completions and as many under a JSON
schema (one long string field, so the grammar does not end the answer early), interleaved:
the median gap between tokens of each, and the grammar's overhead per token.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

PROMPT = "Once upon a time, in a small village by the sea, there lived"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


TEXT = Path(__file__).resolve().parents[1] / "tests/data/shakespeare/alls_well_that_ends_well.txt"


def start_server(
    model: str, port: int, max_batch: int, threads: int | None, *flags: str, log=None
) -> subprocess.Popen:
    """A `tinyformers serve` on `port`, once /health answers; its stderr goes to `log` (an open
    file), else nowhere."""
    command = [sys.executable, "-m", "tinyformers", "serve", "--model", model, "--port", str(port)]
    command += ["--max-batch", str(max_batch)] + (["--threads", str(threads)] if threads else [])
    command += flags
    log = log or subprocess.DEVNULL
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=log)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"the server exited with {process.returncode}: {' '.join(command)}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health").status_code == 200:
                return process
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    process.kill()
    raise SystemExit("the server did not get ready in 300 s")


async def events(client: httpx.AsyncClient, url: str, body: dict):
    """The JSON events of one streamed request to `url`."""
    async with client.stream("POST", url, json=body) as response:
        async for line in response.aiter_lines():
            if line.startswith("data: {"):
                yield json.loads(line[6:])


async def one_stream(client: httpx.AsyncClient, url: str, seed: int, tokens: int, **extra) -> dict:
    """(time to first token, gaps between text events, completion tokens) of one request."""
    body = {
        "prompt": PROMPT,
        "max_tokens": tokens,
        "seed": seed,
        "stream": True,
        "stream_options": {"include_usage": True},
        **extra,
    }
    start = time.perf_counter()
    times, usage = [], 0
    async for chunk in events(client, f"{url}/v1/completions", body):
        if chunk.get("usage"):
            usage = chunk["usage"]["completion_tokens"]
        elif chunk["choices"] and chunk["choices"][0]["text"]:
            times.append(time.perf_counter())
    gaps = [b - a for a, b in zip(times, times[1:], strict=False)]
    return {"ttft": times[0] - start if times else float("nan"), "gaps": gaps, "tokens": usage}


async def level(url: str, clients: int, rounds: int, tokens: int) -> dict:
    """Every client sends `rounds` requests in turn, all clients at once."""
    async with httpx.AsyncClient(timeout=600) as client:

        async def one_client(c: int) -> list[dict]:
            return [await one_stream(client, url, 1000 * c + r, tokens) for r in range(rounds)]

        start = time.perf_counter()
        results = await asyncio.gather(*(one_client(c) for c in range(clients)))
        wall = time.perf_counter() - start
    runs = [r for client_runs in results for r in client_runs]
    ttft = [r["ttft"] for r in runs]
    gaps = [g for r in runs for g in r["gaps"]]
    total = sum(r["tokens"] for r in runs)
    return {
        "clients": clients,
        "requests": len(runs),
        "ttft_p50": percentile(ttft, 50),
        "ttft_p99": percentile(ttft, 99),
        "gap_p50": percentile(gaps, 50),
        "gap_p99": percentile(gaps, 99),
        "tokens": total,
        "tok_s": total / wall,
    }


async def chat_turns(url: str, turns: int, chars: int, tokens: int) -> list[dict]:
    """(prompt tokens, cached tokens, time to first token) of each turn of one chat."""
    text = TEXT.read_text()[5000:]
    messages, rows = [], []
    async with httpx.AsyncClient(timeout=600) as client:
        for turn in range(turns):
            passage = text[turn * chars : (turn + 1) * chars]
            messages.append({"role": "user", "content": f"Summarize this passage:\n{passage}"})
            body = {
                "messages": messages,
                "max_tokens": tokens,
                "temperature": 0,
                "stream": True,
                "stream_options": {"include_usage": True},
            }
            start, first, answer = time.perf_counter(), None, ""
            async for chunk in events(client, f"{url}/v1/chat/completions", body):
                if chunk.get("usage"):
                    usage = chunk["usage"]
                elif chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                    first = first or time.perf_counter()
                    answer += chunk["choices"][0]["delta"]["content"]
            messages.append({"role": "assistant", "content": answer})
            rows.append(
                {
                    "prompt": usage["prompt_tokens"],
                    "cached": usage["prompt_tokens_details"]["cached_tokens"],
                    "ttft": (first or time.perf_counter()) - start,
                }
            )
    return rows


def multi_turn(args: argparse.Namespace) -> None:
    """The chat on a server with the prompt cache, then on one without; a table per turn."""
    runs = {}
    for name, flags in (("cache", []), ("none", ["--cache-tokens", "0"])):
        port = free_port()
        # room for every turn: ~300 tokens asked + the answer + the template's, each turn
        context = str(args.turns * (args.turn_chars // 3 + args.tokens + 32))
        server = start_server(args.model, port, 1, args.threads, "--context", context, *flags)
        url = f"http://127.0.0.1:{port}"
        try:
            asyncio.run(level(url, 1, 1, 8))  # warm-up: first-call costs out of the figures
            runs[name] = asyncio.run(chat_turns(url, args.turns, args.turn_chars, args.tokens))
        finally:
            server.terminate()
            server.wait(30)
    print(f"{args.model}, {cpu_name()}, {os.cpu_count()} CPUs, {args.tokens} tokens an answer")
    print("| turn | prompt tokens | cached | TTFT cached s | TTFT uncached s | speed-up |")
    print("|---|---|---|---|---|---|")
    for turn, (ours, plain) in enumerate(zip(runs["cache"], runs["none"], strict=True), 1):
        print(
            f"| {turn} | {ours['prompt']} | {ours['cached']} | {ours['ttft']:.2f} | "
            f"{plain['ttft']:.2f} | {plain['ttft'] / ours['ttft']:.1f}x |"
        )


LONG_STRING = {  # a schema that lets the answer run to max_tokens
    "type": "json_schema",
    "json_schema": {
        "name": "story",
        "schema": {
            "type": "object",
            "properties": {"story": {"type": "string", "maxLength": 4000}},
            "required": ["story"],
        },
    },
}


async def grammar_gaps(url: str, rounds: int, tokens: int) -> dict[str, list[float]]:
    """Gaps between tokens of free and schema-constrained streams, taken in turn."""
    gaps: dict[str, list[float]] = {"free": [], "schema": []}
    async with httpx.AsyncClient(timeout=600) as client:
        for r in range(rounds):
            free = await one_stream(client, url, r, tokens)
            schema = await one_stream(client, url, r, tokens, response_format=LONG_STRING)
            gaps["free"] += free["gaps"]
            gaps["schema"] += schema["gaps"]
    return gaps


def grammar(args: argparse.Namespace) -> None:
    """The per-token cost of decoding under a JSON schema, on one server."""
    port = free_port()
    server = start_server(args.model, port, 1, args.threads)
    url = f"http://127.0.0.1:{port}"
    try:
        # warm-up: first-call costs out, and the schema's vocabulary read once
        asyncio.run(grammar_gaps(url, 1, 8))
        gaps = asyncio.run(grammar_gaps(url, args.rounds, args.tokens))
    finally:
        server.terminate()
        server.wait(30)
    free, schema = (1000 * percentile(gaps[k], 50) for k in ("free", "schema"))
    print(
        f"{args.model}, {cpu_name()}, {os.cpu_count()} CPUs, {args.rounds} x {args.tokens} tokens"
    )
    print("| decoding | gap p50 ms | tokens |")
    print("|---|---|---|")
    print(f"| free text | {free:.2f} | {len(gaps['free'])} |")
    print(f"| json_schema | {schema:.2f} | {len(gaps['schema'])} |")
    print(f"grammar overhead: {schema - free:+.2f} ms a token, {100 * (schema / free - 1):+.1f}%")


def cpu_name() -> str:
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        cpu = next((line.split(":", 1)[1].strip() for line in f if "model name" in line), cpu)
    return cpu


def percentile(values: list[float], p: float) -> float:
    """The nearest-rank percentile (p99 of a few hundred values is their near-maximum)."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(p / 100 * len(ordered) + 0.5) - 1))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--clients", default="1,4,8")
    parser.add_argument("--rounds", type=int, default=2, help="requests per client, in turn")
    parser.add_argument("--tokens", type=int, default=64, help="max_tokens of each request")
    parser.add_argument("--threads", type=int, default=None, help="the server's --threads")
    parser.add_argument("--turns", type=int, default=0, help="run the multi-turn chat instead")
    parser.add_argument("--turn-chars", type=int, default=1200, help="characters a user turn")
    parser.add_argument("--grammar", action="store_true", help="the JSON schema's cost instead")
    parser.add_argument("--soak", type=float, default=0, help="seconds of a soak (soak.py)")
    args = parser.parse_args()
    if args.soak:
        from benchmarks.soak import soak

        return soak(args)
    if args.turns:
        return multi_turn(args)
    if args.grammar:
        return grammar(args)
    levels = [int(c) for c in args.clients.split(",")]
    port = free_port()
    server = start_server(args.model, port, max(levels), args.threads)
    url = f"http://127.0.0.1:{port}"
    try:
        asyncio.run(level(url, 1, 1, 8))  # warm-up: first-call costs out of the figures
        rows = [asyncio.run(level(url, c, args.rounds, args.tokens)) for c in levels]
    finally:
        server.terminate()
        server.wait(30)
    print(f"{args.model}, {cpu_name()}, {os.cpu_count()} CPUs, {args.tokens} tokens a request")
    print(
        "| clients | requests | TTFT p50 s | TTFT p99 s | gap p50 ms | gap p99 ms | tok/s | vs 1 |"
    )
    print("|---|---|---|---|---|---|---|---|")
    base = rows[0]["tok_s"]
    for r in rows:
        print(
            f"| {r['clients']} | {r['requests']} | {r['ttft_p50']:.2f} | {r['ttft_p99']:.2f} | "
            f"{1000 * r['gap_p50']:.0f} | {1000 * r['gap_p99']:.0f} | {r['tok_s']:.1f} | "
            f"{r['tok_s'] / base:.2f}x |"
        )


if __name__ == "__main__":
    main()
