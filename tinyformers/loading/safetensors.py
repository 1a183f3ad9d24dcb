"""A strict safetensors reader that never holds two copies of the weights, and its writer.

Format: 8 bytes little-endian header length N, N bytes of JSON {name: {dtype, shape,
data_offsets: [begin, end]}, "__metadata__": {...}}, then the tensor bytes.

subtle: the `safetensors` package maps the file and hands out views of the mapping; copying or
transposing those views keeps the mapped pages resident beside the copies (2x RSS). We map the
file, copy each tensor out and tell the kernel we are done with the pages at once.
"""

from __future__ import annotations

import json
import math
import mmap
import os
import struct
from pathlib import Path
from typing import Any

import torch

from tinyformers.errors import CheckpointError
from tinyformers.loading.atomic import atomic_path
from tinyformers.loading.json_file import parse_json

DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
MAX_HEADER = 100 * 2**20  # the reference implementation's own limit
MAX_TENSORS = 1 << 16  # per file; the largest real ones (unfused MoE experts) hold ~20K
CHUNK = 16 * 2**20


def read_header(path: Path, size: int, f) -> tuple[dict, int]:
    """The JSON header (metadata removed) and where the data starts, checked against the file.

    As the format requires (and the reference reader checks): UTF-8 JSON with no key twice,
    tensors that tile the data exactly, with no gap, no overlap and nothing after the last.
    """
    head = f.read(8)
    if len(head) < 8:
        raise CheckpointError(f"{path}: truncated safetensors file ({size} bytes)")
    (n,) = struct.unpack("<Q", head)
    if n > MAX_HEADER or 8 + n > size:
        raise CheckpointError(f"{path}: header length {n} does not fit the file ({size} bytes)")
    raw = f.read(n)
    # subtle: every tensor is a JSON object, so counting "{" bounds the tensors before the
    # parse, which for a 100 MB header of 1M tiny tensors took 20 s and 1.8 GB
    if raw.count(b"{") > MAX_TENSORS + 2:
        raise CheckpointError(f"{path}: header lists over {MAX_TENSORS} tensors")
    try:
        text = raw.decode("utf-8")  # json.loads would guess UTF-16 or UTF-32 from the bytes
    except UnicodeDecodeError as e:
        raise CheckpointError(f"{path}: header is not UTF-8 (byte {e.start})") from e
    header = parse_json(text, f"{path}: header", CheckpointError, _no_duplicate_keys)
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: header is not a JSON object")
    header.pop("__metadata__", None)
    data_start, data_size = 8 + n, size - 8 - n
    end = 0
    for name, info in sorted(header.items(), key=lambda kv: _offsets(path, kv)[0]):
        begin, stop = _offsets(path, (name, info))
        if not isinstance(info.get("dtype"), str) or info["dtype"] not in DTYPES:
            raise CheckpointError(f"{path}: tensor {name}: unsupported dtype {info.get('dtype')!r}")
        shape = info.get("shape")
        if not isinstance(shape, list) or not all(_is_int(d) and 0 <= d < 2**63 for d in shape):
            raise CheckpointError(
                f"{path}: tensor {name}: bad shape {shape!r:.80} (expected sizes 0 to 2^63 - 1)"
            )
        expected = math.prod(shape) * DTYPES[info["dtype"]].itemsize
        if stop - begin != expected:
            raise CheckpointError(
                f"{path}: tensor {name}: {stop - begin} bytes for shape {shape} "
                f"{info['dtype']} (expected {expected})"
            )
        if begin != end:
            problem = "overlaps the tensor before it" if begin < end else "leaves a gap before it"
            raise CheckpointError(f"{path}: tensor {name}: {problem} (byte {begin}, not {end})")
        if stop > data_size:
            raise CheckpointError(
                f"{path}: tensor {name} ends at byte {data_start + stop}, past the end of the "
                f"file ({size} bytes): truncated?"
            )
        end = stop
    if end != data_size:
        raise CheckpointError(
            f"{path}: {data_size - end} bytes after the last tensor (the tensors must cover "
            "the data exactly)"
        )
    return header, data_start


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A JSON object as a dict; a key given twice is refused (json.loads keeps the last)."""
    obj = dict(pairs)
    if len(obj) != len(pairs):
        seen: set[str] = set()
        twice = next(k for k, _ in pairs if k in seen or seen.add(k))
        raise ValueError(f"key {twice!r:.80} appears twice")
    return obj


def _offsets(path: Path, item: tuple[str, dict]) -> tuple[int, int]:
    name, info = item
    offsets = info.get("data_offsets") if isinstance(info, dict) else None
    if not (
        isinstance(offsets, list)
        and len(offsets) == 2
        and all(_is_int(o) for o in offsets)
        and 0 <= offsets[0] <= offsets[1]
    ):
        raise CheckpointError(f"{path}: tensor {name}: bad data_offsets {offsets!r}")
    return offsets[0], offsets[1]


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)  # JSON true is not a size


def load_safetensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Every tensor of a .safetensors file, copied out of a memory map one at a time."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        header, data_start = read_header(path, size, f)
        if not header:
            return {}
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY) as mm:
            tensors = {}
            for name, info in header.items():
                begin, stop = info["data_offsets"]
                flat = torch.empty(stop - begin, dtype=torch.uint8)
                for start in range(0, stop - begin, CHUNK):  # copy in chunks, dropping as we go
                    n = min(CHUNK, stop - begin - start)
                    offset = data_start + begin + start
                    flat[start : start + n] = torch.frombuffer(
                        mm, dtype=torch.uint8, count=n, offset=offset
                    )
                    _drop_pages(mm)
                tensors[name] = flat.view(DTYPES[info["dtype"]]).reshape(info["shape"])
            return tensors


def _drop_pages(mm: mmap.mmap) -> None:
    """Unmap the pages we copied from: they stay in the page cache, out of our RSS."""
    if hasattr(mmap, "MADV_DONTNEED"):
        mm.madvise(mmap.MADV_DONTNEED)


def map_safetensors(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], mmap.mmap]:
    """Every tensor of a .safetensors file as a view of one private memory map, and the map.

    Nothing is read until a view is copied, and then only the pages it touches: tensor parallel
    copies each rank's slice out of these views (parallel/shard.py), then drops the pages with
    `map.madvise(mmap.MADV_DONTNEED)`, so a rank never holds the whole file.
    """
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        header, data_start = read_header(path, size, f)
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)  # writes never reach the file
    data = torch.frombuffer(mm, dtype=torch.uint8)  # keeps the map open while a view lives
    tensors = {}
    for name, info in header.items():
        begin, stop = info["data_offsets"]
        dtype = DTYPES[info["dtype"]]
        raw = data[data_start + begin : data_start + stop]
        if (data_start + begin) % dtype.itemsize:  # a misaligned tensor: this one is copied
            raw = raw.clone()
        tensors[name] = raw.view(dtype).reshape(info["shape"])
    return tensors, mm


def save_safetensors(
    path: str | os.PathLike,
    tensors: dict[str, torch.Tensor],
    metadata: dict[str, str] | None = None,
) -> None:
    """Write `tensors` as a .safetensors file (Hugging Face's format, read by its `safetensors`
    and `transformers`), through a temporary name: a failed write leaves the old file whole.

    subtle: written one tensor at a time, straight from its memory: the `safetensors` package
    refuses tensors that share memory, and training keeps every weight as a view of one block
    (training/optim.py), so it would need a copy of the whole model first.
    """
    names = {dtype: name for name, dtype in DTYPES.items()}
    header: dict = {"__metadata__": metadata} if metadata else {}
    offset = 0
    for name, t in tensors.items():
        size = t.numel() * t.element_size()
        header[name] = {
            "dtype": names[t.dtype],
            "shape": list(t.shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned, as the reference writes
    with atomic_path(Path(path)) as tmp, open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text)
        for t in tensors.values():
            data = t.detach().to("cpu").contiguous().view(-1)
            if data.numel():
                f.write(data.view(torch.uint8).numpy().data)
