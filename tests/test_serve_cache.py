"""The prompt cache: a prompt whose first tokens were computed before starts from their keys and
values and gives the same tokens as without the cache (greedy and seeded, turn after turn, in a
concurrent batch), `usage.prompt_tokens_details.cached_tokens` says how many it reused, and the
pool keeps within its bound, evicting the least recently used blocks, never a chain's head first.
"""

from __future__ import annotations

import contextlib
import random
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
import torch
from test_serve import chat_dir, free_port, running_server, wait_ready  # noqa: F401  (chat_dir: a fixture)

import tinyformers
from tinyformers.models.kv_cache import KVCache
from tinyformers.serve.prompt_cache import BLOCK, PromptCache

# -- the pool alone, on a cache whose slot s holds a value made from tokens 0..s -----------------


def fill(c: KVCache, row: int, tokens: list[int]) -> None:
    """Write into `row` what a causal model would: at slot s, a value of tokens[: s + 1] only."""
    value = 0.0
    for s, t in enumerate(tokens):
        value = (value * 31 + t + 1) % 1000.0
        c.k[row, :, s] = value
        c.v[row, :, s] = -value


def test_a_stored_prefix_loads_into_another_row_exactly():
    rows = [KVCache(2, 2, 64, 4, torch.float32)]
    tokens = list(range(40))
    fill(rows[0], 0, tokens)
    cache = PromptCache(rows, tokens=4 * BLOCK)
    cache.store(tokens, row=0)
    assert len(cache) == 32  # two whole blocks; the last 8 tokens make no block
    assert cache.load(tokens + [7, 8], row=1, limit=41) == 32
    assert torch.equal(rows[0].k[1, :, :32], rows[0].k[0, :, :32])
    assert torch.equal(rows[0].v[1, :, :32], rows[0].v[0, :, :32])
    assert cache.load(tokens[:32], row=1, limit=31) == 31  # one token left to prefill
    assert cache.load(tokens[:20] + [99] * 20, row=1, limit=39) == 16  # differs in block 2
    assert cache.load([99] + tokens[1:], row=1, limit=39) == 0  # differs at the start


def test_random_traffic_stays_in_bound_and_loads_only_what_was_computed():
    """Prompts that continue or cut earlier ones: after every store, the pool holds at most its
    bound and every block's parent is still there, and a load gives exactly the values a
    prefill of the loaded tokens writes."""
    rng = random.Random(0)
    rows = [KVCache(2, 1, 96, 2, torch.float32)]
    cache = PromptCache(rows, tokens=6 * BLOCK)
    seen, reused = [[]], 0
    for _ in range(300):
        base = rng.choice(seen[-4:])  # a recent prompt, continued or cut
        tokens = base[: rng.randrange(len(base) + 1)] + [rng.randrange(50) for _ in range(20)]
        tokens = tokens[:96]
        n = cache.load(tokens, row=1, limit=len(tokens) - 1)
        fill(rows[0], 0, tokens)
        assert torch.equal(rows[0].k[1, :, :n], rows[0].k[0, :, :n])
        cache.store(tokens, row=0)
        assert len(cache) <= 6 * BLOCK
        serials = {b.serial for b in cache.blocks.values()} | {0}
        assert all(parent in serials for parent, _ in cache.blocks)
        seen.append(tokens)
        reused += n
    assert reused > 100 * BLOCK  # many prompts found a cached prefix


def test_eviction_takes_the_least_recently_used_leaf():
    rows = [KVCache(1, 1, 64, 2, torch.float32)]
    cache = PromptCache(rows, tokens=3 * BLOCK)
    a, b, c = ([i] * 2 * BLOCK for i in range(3))
    cache.store(a, row=0)
    cache.store(b, row=0)  # room for one more block: a's second one goes, a's first stays
    assert (cache.load(a, 0, 99), cache.load(b, 0, 99)) == (BLOCK, 2 * BLOCK)
    cache.store(c[:BLOCK], row=0)  # a was used before b: a goes
    assert (cache.load(a, 0, 99), cache.load(b, 0, 99), cache.load(c, 0, 99)) == (0, 32, 16)


# -- through the official client: a server with the cache against one without ---------------


@pytest.fixture(scope="module")
def clients(chat_dir):  # noqa: F811
    """(with the prompt cache, without it): two servers on copies of one model."""
    with (
        running_server(lambda: tinyformers.load(chat_dir), max_batch=4, context=512) as (a, _),
        running_server(
            lambda: tinyformers.load(chat_dir), max_batch=4, context=512, cache_tokens=0
        ) as (b, _),
    ):
        wait_ready(a)
        wait_ready(b)
        yield tuple(openai.OpenAI(base_url=f"{u}/v1", api_key="x", max_retries=0) for u in (a, b))


def conversation(client, **sampling) -> tuple[list[str], list[int], list[int]]:
    """Four turns of a chat that resends its history: the answers, prompt and cached tokens."""
    messages, answers, prompt, cached = [{"role": "system", "content": "Be kind. " * 8}], [], [], []
    for turn in range(4):
        messages.append({"role": "user", "content": f"Question {turn}: what comes next?"})
        answer = client.chat.completions.create(
            model="x", messages=messages, max_tokens=24, **sampling
        )
        text = answer.choices[0].message.content
        messages.append({"role": "assistant", "content": text})
        answers.append(text)
        prompt.append(answer.usage.prompt_tokens)
        cached.append(answer.usage.prompt_tokens_details.cached_tokens)
    return answers, prompt, cached


@pytest.mark.parametrize("sampling", [{"temperature": 0}, {"temperature": 1.0, "seed": 5}])
def test_a_chat_turn_after_turn_gives_the_same_answers_with_the_cache(clients, sampling):
    cached_server, plain_server = clients
    answers, prompt, cached = conversation(cached_server, **sampling)
    expected, _, none = conversation(plain_server, **sampling)
    assert answers == expected and none == [0, 0, 0, 0]
    for turn in range(1, 4):  # each turn starts with the whole of the turn before
        assert prompt[turn - 1] // BLOCK * BLOCK <= cached[turn] < prompt[turn]
        assert cached[turn] % BLOCK == 0


def test_concurrent_requests_sharing_a_system_prompt_give_the_same_tokens(clients):
    system = {"role": "system", "content": "You answer in one line. " * 6}

    def ask(client, i):
        messages = [system, {"role": "user", "content": f"Name thing {i}."}]
        options = {"temperature": 0.8, "seed": i} if i % 2 else {"temperature": 0}
        answer = client.chat.completions.create(
            model="x", messages=messages, max_tokens=16, **options
        )
        return answer.choices[0].message.content, answer.usage.prompt_tokens_details.cached_tokens

    cached_server, plain_server = clients
    with ThreadPoolExecutor(6) as pool:
        ours = list(pool.map(lambda i: ask(cached_server, i), range(6)))
        theirs = list(pool.map(lambda i: ask(plain_server, i), range(6)))
    assert [text for text, _ in ours] == [text for text, _ in theirs]
    assert max(n for _, n in ours) >= 48  # the shared system prompt, once some row computed it


def test_cached_tokens_count_whole_blocks_of_the_prefix_streamed_or_not(clients):
    client = clients[0]
    first = list(range(1000, 1040))  # 40 token ids: two whole blocks
    answer = client.completions.create(model="x", prompt=first, max_tokens=1, temperature=0)
    assert answer.usage.prompt_tokens_details.cached_tokens == 0
    # max_tokens 1: the sampled token was never fed, so only the prompt's blocks are cached
    stream = client.completions.create(
        model="x",
        prompt=first + [7, 8, 9],
        max_tokens=3,
        stream=True,
        stream_options={"include_usage": True},
    )
    usage = list(stream)[-1].usage
    assert (usage.prompt_tokens, usage.prompt_tokens_details.cached_tokens) == (43, 32)
    # n choices of one new prompt: the first computes it, the others reuse it; counted once
    answer = client.completions.create(model="x", prompt=list(range(2000, 2040)), n=3)
    assert answer.usage.prompt_tokens_details.cached_tokens == 0


def test_cache_tokens_flag_bounds_the_cache(gpt2_small_dir):
    """`tinyformers serve --cache-tokens 32`: two blocks, so a 48-token prompt sent again reuses
    32 of them."""
    port = free_port()
    command = [sys.executable, "-m", "tinyformers", "serve", "--model", str(gpt2_small_dir)]
    command += ["--port", str(port), "--cache-tokens", "32"]
    quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}
    process = subprocess.Popen(command, **quiet)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            assert process.poll() is None and time.monotonic() < deadline
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(f"{url}/health").status_code == 200:
                    break
            time.sleep(0.1)
        body = {"prompt": list(range(500, 548)), "max_tokens": 1}
        cached = [
            httpx.post(f"{url}/v1/completions", json=body).json()["usage"]["prompt_tokens_details"]
            for _ in range(2)
        ]
        assert cached == [{"cached_tokens": 0}, {"cached_tokens": 32}]
    finally:
        process.terminate()
        process.wait(30)
