"""Prompt budgeting: whether a prompt and its new tokens fit the model's context and the
memory their KV cache needs, checked before the work (tokenizing, allocating) that would fail.
Used by `LanguageModel` (and so the CLI) and by the server's request translation.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from tinyformers.errors import ContextLengthError
from tinyformers.tokenizers import prompt_ids


def most_chars(tokenizer, tokens: int) -> int:
    """The most characters a text of `tokens` tokens can have.

    subtle: a token holds at most `max_token_bytes` bytes and a character at least one, so a
    longer text can never fit: refuse it before tokenizing megabytes.
    """
    return tokens * tokenizer.max_token_bytes


def encode_within(
    tokenizer, prompt: str, context: int, max_new_tokens: int, truncate: bool
) -> list[int]:
    """The prompt's ids (BOS first where the tokenizer asks for it), refused before
    tokenizing when it cannot fit `context` with `max_new_tokens`; with `truncate`, only a
    tail that still overfills the room twice is tokenized (`fit_context` then keeps the
    latest tokens, far from the cut)."""
    room = context - max_new_tokens
    most = most_chars(tokenizer, room)
    if max_new_tokens > 0 and room > 0 and len(prompt) > most:
        if not truncate:
            raise ContextLengthError(
                f"prompt of {len(prompt)} characters + {max_new_tokens} new tokens exceeds "
                f"the model's context of {context} tokens (a token holds "
                f"{tokenizer.max_token_bytes} bytes at most); use --truncate "
                "(truncate=True) or fewer new tokens"
            )
        prompt = prompt[-2 * most :]
    return prompt_ids(tokenizer, prompt)


def fit_context(
    prompt: list[int], max_new_tokens: int, context_length: int, truncate: bool
) -> list[int]:
    """The prompt if it fits the context with the new tokens; with `truncate`, its latest tokens."""
    if max_new_tokens <= 0:
        raise ValueError(f"max_new_tokens must be > 0, got {max_new_tokens}")
    if not prompt:
        raise ValueError("the prompt is empty: nothing to continue from")
    room = context_length - max_new_tokens
    if len(prompt) <= room:
        return prompt
    if truncate and room > 0:
        return prompt[-room:]
    raise ContextLengthError(
        f"prompt of {len(prompt)} tokens + {max_new_tokens} new tokens exceeds the model's "
        f"context of {context_length} tokens"
        + ("" if room <= 0 else "; use --truncate (truncate=True) or fewer new tokens")
    )


def check_cache_memory(
    net: nn.Module, prompt_tokens: int, max_new_tokens: int, device: torch.device
) -> None:
    """ContextLengthError unless the KV cache of prompt + new tokens (allocated whole, beside
    int64 rows of the same length: mask, history, positions) fits in 3/4 of the free memory.
    A config may claim a context of 2^31 tokens; -n 2e8 with one 8-wide layer is 13 GB of
    cache and 10 more of bookkeeping, and must fail here, not crash."""
    per_token = sum(c.k.nbytes + c.v.nbytes for c in net.make_cache(1, 1)) + _BOOKKEEPING_BYTES
    need = (prompt_tokens + max_new_tokens) * per_token
    free = _free_memory(device)
    if need > 0.75 * free:
        raise ContextLengthError(
            f"prompt of {prompt_tokens} tokens + {max_new_tokens} new tokens needs "
            f"{need / 2**30:.1f} GiB of KV cache; {free / 2**30:.1f} GiB is free (at most "
            "3/4 of it is used)"
        )


_BOOKKEEPING_BYTES = 64  # per token of the cache: generation's int64 rows and temporaries


def _free_memory(device: torch.device) -> int:
    """Bytes that can still be allocated on `device`: for the CPU the least of MemAvailable,
    the room under this process's cgroup limit and under its address-space limit (ulimit -v),
    any of which may be far below the machine's free memory."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    rooms = [_meminfo("/proc/meminfo", "MemAvailable:"), _cgroup_room(), _address_space_room()]
    known = [room for room in rooms if room is not None]
    if known:
        return min(known)
    if hasattr(os, "sysconf") and "SC_AVPHYS_PAGES" in os.sysconf_names:  # not Linux
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    return 1 << 62


def _meminfo(path: str, key: str) -> int | None:
    """A "Key: N kB" line of a /proc file, in bytes; None where there is none."""
    try:
        with open(path) as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key))
    except (OSError, StopIteration, ValueError, IndexError):
        return None


def _cgroup_room() -> int | None:
    """The cgroup's memory limit less its use (v2, else v1); None without a limit."""
    for limit, usage in (
        ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
        (
            "/sys/fs/cgroup/memory/memory.limit_in_bytes",
            "/sys/fs/cgroup/memory/memory.usage_in_bytes",
        ),
    ):
        try:
            cap, used = Path(limit).read_text().strip(), Path(usage).read_text().strip()
        except OSError:
            continue
        if cap.isdigit() and used.isdigit() and int(cap) < 1 << 60:  # v1 "no limit" is ~2^63
            return max(0, int(cap) - int(used))
    return None


def _address_space_room() -> int | None:
    """Room under RLIMIT_AS (ulimit -v) for this process; None when unlimited."""
    try:
        import resource
    except ImportError:  # not Unix
        return None
    soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    size = _meminfo("/proc/self/status", "VmSize:")
    if soft == resource.RLIM_INFINITY or size is None:
        return None
    return max(0, soft - size)
