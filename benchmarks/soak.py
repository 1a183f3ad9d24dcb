"""A soak of `tinyformers serve`: `python -m benchmarks.serve --soak 600 [--clients 8]`.

The clients (`--clients`, 8 by default) each send requests one after another for `--soak`
seconds, every request one of these kinds, drawn at random:

    stream        a streamed completion read to its end            -> 200 and a finish_reason
    chat          a chat completion, not streamed                  -> 200 and a finish_reason
    disconnect    a streamed completion dropped after 1-3 events   -> nothing expected
    slow_reader   a streamed completion read with 0.3 s pauses     -> 200 and a finish_reason
    malformed     a body that is not JSON, or a field of the wrong type -> 400 or 422
    oversized     a 9 MB body (the server takes 8 MB)              -> 413

A request of the first kinds that does not end as expected is lost; so is a 4xx or 5xx where
a 200 was due, or an error where a 4xx was. The server's resident memory (VmRSS) is read after
a warm-up, every 30 s and at the end, after the clients stop and the server has drained.
Prints one JSON line: requests by kind and outcome, lost requests (and why, with the time),
RSS start, end, every 30 s sample in MB, the machine, and the server's log (its stderr, kept
in the temp folder) with the count of its ERROR and Traceback lines.

The server runs with `--cache-tokens 0`: the prompt cache grows by design up to its bound
(--max-batch x --context tokens of keys and values, ~3 GB for SmolLM2 at 8 rows), which would
hide a leak; its bound has its own test (tests/test_serve_cache.py).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import tempfile
import time
from pathlib import Path

import httpx

from benchmarks.serve import PROMPT, cpu_name, free_port, start_server

KINDS = ["stream", "chat", "disconnect", "slow_reader", "malformed", "oversized"]
WEIGHTS = [4, 2, 2, 1, 1, 1]


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        return int(next(line for line in f if line.startswith("VmRSS:")).split()[1]) / 1024


async def one_request(client: httpx.AsyncClient, url: str, kind: str, rng: random.Random) -> str:
    """The outcome of one request of `kind`: "ok", or what went wrong (a lost request)."""
    body = {"prompt": PROMPT, "max_tokens": rng.randint(1, 24), "seed": rng.randrange(1 << 30)}
    if kind == "chat":
        messages = [{"role": "user", "content": "Tell me a short story."}]
        response = await client.post(
            f"{url}/v1/chat/completions", json={"messages": messages, "max_tokens": 16}
        )
        finished = response.status_code == 200 and response.json()["choices"][0]["finish_reason"]
        return "ok" if finished else f"chat answered {response.status_code}"
    if kind == "malformed":
        content, expected = rng.choice(
            [
                (b"{not json", (400, 422)),
                (json.dumps(body | {"max_tokens": "x"}).encode(), (400, 422)),
            ]
        )
        response = await client.post(
            f"{url}/v1/completions", content=content, headers={"content-type": "application/json"}
        )
        return "ok" if response.status_code in expected else f"malformed got {response.status_code}"
    if kind == "oversized":
        big = json.dumps(body | {"prompt": "a" * (9 * 2**20)}).encode()
        response = await client.post(
            f"{url}/v1/completions", content=big, headers={"content-type": "application/json"}
        )
        return "ok" if response.status_code == 413 else f"oversized got {response.status_code}"
    body |= {"stream": True}
    keep = rng.randint(1, 3) if kind == "disconnect" else None
    finish, events = None, 0
    async with client.stream("POST", f"{url}/v1/completions", json=body) as response:
        if response.status_code != 200:
            return f"{kind} answered {response.status_code}"
        async for line in response.aiter_lines():
            if not line.startswith("data: {"):
                continue
            events += 1
            if keep is not None and events >= keep:
                return "ok"  # leaving the block closes the connection mid-stream
            if kind == "slow_reader":
                await asyncio.sleep(0.3)
            choice = json.loads(line[6:])["choices"]
            finish = finish or (choice and choice[0].get("finish_reason"))
    return "ok" if finish or keep is not None else f"{kind} ended without a finish_reason"


async def client_loop(url: str, seed: int, stop_at: float, tally: dict, lost: list) -> None:
    rng = random.Random(seed)
    async with httpx.AsyncClient(timeout=120) as client:
        while time.monotonic() < stop_at:
            kind = rng.choices(KINDS, WEIGHTS)[0]
            try:
                outcome = await one_request(client, url, kind, rng)
            except (httpx.HTTPError, ValueError, KeyError) as e:
                cause = e.__cause__ or e.__context__  # httpx's ReadError says nothing itself
                outcome = f"{kind}: {type(e).__name__}: {e} ({cause!r}) at {time.ctime()}"
            key = f"{kind} {'ok' if outcome == 'ok' else 'lost'}"
            tally[key] = tally.get(key, 0) + 1
            if outcome != "ok":
                lost.append(outcome)


async def run_soak(url: str, pid: int, clients: int, seconds: float) -> dict:
    start_rss = rss_mb(pid)
    samples = [start_rss]
    tally: dict[str, int] = {}
    lost: list[str] = []
    stop_at = time.monotonic() + seconds

    async def sample() -> None:
        while time.monotonic() < stop_at:
            await asyncio.sleep(30)
            samples.append(rss_mb(pid))

    sampler = asyncio.create_task(sample())
    await asyncio.gather(*(client_loop(url, c, stop_at, tally, lost) for c in range(clients)))
    sampler.cancel()
    await asyncio.sleep(5)  # dropped streams finish their step and free their rows
    async with httpx.AsyncClient(timeout=60) as client:
        healthy = (await client.get(f"{url}/health")).status_code == 200
    end_rss = rss_mb(pid)
    return {
        "clients": clients,
        "seconds": seconds,
        "requests": sum(tally.values()),
        "by_kind": dict(sorted(tally.items())),
        "lost": len(lost),
        "lost_examples": sorted(set(lost))[:5],
        "healthy_at_end": healthy,
        "rss_start_mb": round(start_rss, 1),
        "rss_end_mb": round(end_rss, 1),
        "rss_samples_mb": [round(x) for x in samples],
    }


def soak(args: argparse.Namespace) -> None:
    """Start a server, warm it up, soak it for `args.soak` seconds; print the JSON summary."""
    clients = int(args.clients.split(",")[-1]) if "," in args.clients else int(args.clients)
    port = free_port()
    log_path = Path(tempfile.gettempdir()) / f"soak-server-{port}.log"
    with log_path.open("w") as log:
        flags = ("--cache-tokens", "0")
        server = start_server(args.model, port, clients, args.threads, *flags, log=log)
        url = f"http://127.0.0.1:{port}"
        try:
            warm = asyncio.run(run_soak(url, server.pid, clients, 20))  # first-call costs, caches
            summary = asyncio.run(run_soak(url, server.pid, clients, args.soak))
        finally:
            server.terminate()
            server.wait(30)
    lines = log_path.read_text().splitlines()
    errors = [ln for ln in lines if ln.startswith(("ERROR", "Traceback"))]
    summary |= {"warm_up_lost": warm["lost"], "model": args.model, "cpu": cpu_name(),
                "cpus": os.cpu_count(), "server_log": str(log_path),
                "server_errors": len(errors)}  # fmt: skip
    print(json.dumps(summary))
