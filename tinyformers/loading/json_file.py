"""Reading the small files of a checkpoint (JSON, merges, templates), trusting none of them.

Every file is opened without blocking and must be a regular file under a size cap: a FIFO or
/dev/zero named config.json fails at once instead of hanging or filling memory. JSON integers
longer than 40 digits are refused (a 5,000-digit int costs seconds and int() raises past
4,300), and nesting deeper than Python's recursion limit (~1,000) is refused too; every
failure is one error of the caller's class naming the file.
"""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tinyformers.errors import CheckpointError, TinyformersError

MAX_FILE_BYTES = 128 * 2**20  # the largest real tokenizer.json (Gemma's 256K vocab) is ~35 MB
MAX_INT_DIGITS = 40  # int64 fits, and HF's "no limit" model_max_length (1e30, 31 digits)


def read_bytes(
    path: Path, error: type[TinyformersError] = CheckpointError, limit: int = MAX_FILE_BYTES
) -> bytes:
    """The bytes of the regular file `path`, at most `limit` of them."""
    try:
        # subtle: O_NONBLOCK so that opening a FIFO returns at once; a regular file ignores it.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except FileNotFoundError as e:
        raise error(f"{path}: not found") from e
    except OSError as e:
        raise error(f"{path}: cannot open ({e.strerror})") from e
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode):
        os.close(fd)
        raise error(f"{path}: not a regular file (a device, FIFO or folder)")
    with os.fdopen(fd, "rb") as f:
        if info.st_size > limit:
            raise error(f"{path}: {info.st_size} bytes, over the {limit} byte limit")
        try:
            return f.read(limit + 1)[:limit]
        except OSError as e:
            raise error(f"{path}: cannot read ({e.strerror})") from e


def read_text(path: Path, error: type[TinyformersError] = CheckpointError) -> str:
    """The UTF-8 text of the regular file `path`."""
    try:
        return read_bytes(path, error).decode("utf-8")
    except UnicodeDecodeError as e:
        raise error(f"{path}: not UTF-8 text (byte {e.start})") from e


def parse_json(
    text: str | bytes,
    where: str,
    error: type[TinyformersError],
    object_pairs_hook: Callable[[list[tuple[str, Any]]], Any] | None = None,
) -> Any:
    """`text` parsed as JSON under the digit and depth limits; `where` names it in errors.
    `object_pairs_hook` as in json.loads (a ValueError it raises names the problem)."""
    try:
        return json.loads(text, parse_int=_int, object_pairs_hook=object_pairs_hook)
    except RecursionError as e:
        raise error(f"{where}: JSON nested too deeply") from e
    except (ValueError, UnicodeDecodeError) as e:  # JSONDecodeError is a ValueError
        raise error(f"{where}: not a readable JSON file ({e})") from e


def read_json(
    path: Path, error: type[TinyformersError] = CheckpointError, *, require_object: bool = True
) -> Any:
    """The JSON in `path` (an object unless `require_object` is False, for callers that check
    the structure themselves); anything else raises `error` naming the file."""
    data = parse_json(read_bytes(path, error), str(path), error)
    if require_object and not isinstance(data, dict):
        raise error(f"{path}: expected a JSON object")
    return data


def _int(digits: str) -> int:
    if len(digits.lstrip("-")) > MAX_INT_DIGITS:
        raise ValueError(f"an integer of {len(digits)} digits (at most {MAX_INT_DIGITS})")
    return int(digits)
