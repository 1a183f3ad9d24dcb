"""Reading a checkpoint's or tokenizer's JSON file, with one-line errors naming the file."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tinyformers.errors import CheckpointError, TinyformersError


def read_json(
    path: Path, error: type[TinyformersError] = CheckpointError, *, require_object: bool = True
) -> Any:
    """The JSON in `path` (an object unless `require_object` is False, for callers that check
    the structure themselves); anything else raises `error` naming the file."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError as e:
        raise error(f"{path}: not found") from e
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise error(f"{path}: not a readable JSON file ({e})") from e
    if require_object and not isinstance(data, dict):
        raise error(f"{path}: expected a JSON object")
    return data
