"""Write a file so that a reader (or a crash, or a full disk) never sees half of it.

The data goes to a temporary name in the same folder, is flushed to disk, then renamed over
the target: a rename within one file system is atomic, so the target holds either the old
file whole or the new one whole. A failed write removes the temporary file and raises.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """A temporary path beside `path` to write to; renamed over `path` when the block ends.

    Example:
        with atomic_path(folder / "metrics.jsonl") as tmp:
            tmp.write_text(lines)
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        yield tmp
        with open(tmp, "rb+") as f:  # on disk before the rename, not only in the page cache
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_atomic(path: Path, data: bytes | str) -> None:
    """`path` holds `data` (str as UTF-8), or its old content if writing fails."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data.encode() if isinstance(data, str) else data)
