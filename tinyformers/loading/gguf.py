"""Read GGUF files (llama.cpp's one-file checkpoints) strictly, trusting no count in them.

Layout, all little-endian (spec: ggml's docs/gguf.md):
    "GGUF" | u32 version | u64 n_tensors | u64 n_kv
    n_kv x      (string key, u32 value type, value)
    n_tensors x (string name, u32 n_dims, u64 ne[n_dims], u32 ggml type, u64 data offset)
    padding to `general.alignment` (default 32), then the tensor data
A string is u64 length + UTF-8 bytes; an array is u32 element type + u64 count + elements.

Every count and length is checked against the bytes left in the file (and a hard cap) before
anything is allocated, so a hostile header fails in microseconds instead of hanging or eating
memory (the `gguf` package hangs on a 2^62-element array; llama.cpp had CVE-2025-53630).
Tensor data is memory-mapped copy-on-write and decoded only when asked for.

Example:
    with read_gguf("SmolLM2-135M-Instruct.Q4_1.gguf") as f:
        f.metadata["llama.block_count"]            # 30
        f.tensor("blk.0.attn_q.weight").shape      # torch.Size([576, 576])
"""

import math
import os
import struct
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from tinyformers.errors import GGUFError
from tinyformers.loading.ggml_quants import BLOCK_LAYOUT, GGMLType, dequantize

DEFAULT_ALIGNMENT = 32
MAX_STRING_BYTES = 1 << 30  # 1 GiB; real strings (chat templates) are a few KiB
MAX_ARRAY_LEN = 1 << 24  # 16M elements; the largest real arrays (vocabularies) hold ~256K
MAX_STRING_ARRAY_LEN = 1 << 21  # 2M strings (0.4 us each in Python); real merge lists ~500K
MAX_ARRAY_DEPTH = 4  # arrays of arrays; ggml itself reads none, gguf-py writes them
MAX_DIMS = 4  # ggml's GGML_MAX_DIMS
INT64_MAX = (1 << 63) - 1  # ggml holds ne and element counts in int64

# metadata value type -> struct format of one element (type 8 is a string, 9 an array)
_SCALAR_FORMATS = {
    0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"
}  # fmt: skip
_STRING, _ARRAY = 8, 9
# fewest bytes one element of each type can take: a string is at least its u64 length,
# an array at least its u32 type and u64 count
_MIN_SIZES = {t: struct.calcsize(f) for t, f in _SCALAR_FORMATS.items()} | {_STRING: 8, _ARRAY: 12}
_U64 = struct.Struct("<Q")
_MIN_KV_BYTES = 8 + 4 + 1  # empty key, value type, smallest value
_MIN_TENSOR_INFO_BYTES = 8 + 4 + 8 + 4 + 8  # empty name, n_dims, one ne, type, offset


@dataclass(frozen=True)
class GGUFTensorInfo:
    """Where a tensor's bytes are and how to decode them, known before any weight is read."""

    name: str
    shape: tuple[int, ...]  # torch order (GGUF's ne reversed): a 2-D weight is (out, in)
    ggml_type: GGMLType
    offset: int  # absolute byte offset in the file
    nbytes: int


class GGUFFile:
    """A parsed GGUF file: metadata and tensor infos in file order, tensor data mapped lazily."""

    def __init__(
        self,
        path: Path,
        version: int,
        alignment: int,
        metadata: dict[str, Any],
        tensors: dict[str, GGUFTensorInfo],
        data: torch.Tensor,
    ) -> None:
        self.path = path
        self.version = version
        self.alignment = alignment
        self.metadata = metadata
        self.tensors = tensors
        self._data: torch.Tensor | None = data  # uint8 view of the whole file

    def raw(self, name: str) -> torch.Tensor:
        """The tensor's bytes as a 1-D uint8 view of the file mapping (no copy)."""
        if self._data is None:
            raise ValueError(f"{self.path}: GGUF file is closed")
        info = self._info(name)
        return self._data[info.offset : info.offset + info.nbytes]

    def tensor(self, name: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The tensor dequantized to `dtype`, shape `info.shape`.

        F32 tensors read as float32 share memory with the copy-on-write mapping (no copy).
        """
        info = self._info(name)
        try:
            return dequantize(self.raw(name), info.ggml_type, info.shape).to(dtype)
        except GGUFError as e:
            raise GGUFError(f"{self.path}: tensor {name!r}: {e}") from e

    def tensor_part(
        self, name: str, dim: int, start: int, stop: int, dtype: torch.dtype = torch.float32
    ) -> torch.Tensor:
        """Rows (dim 0) or columns (dim 1) start:stop of a tensor, dequantized from only the
        blocks that hold them: one rank's slice under tensor parallel.

        Example: f.tensor_part("blk.0.attn_q.weight", 0, 0, 192).shape == (192, 576)
        """
        info = self._info(name)
        if len(info.shape) == 1 or (dim == 0 and start == 0 and stop == info.shape[0]):
            return self.tensor(name, dtype).narrow(dim, start, stop - start)
        rows, cols = info.shape[0], math.prod(info.shape[1:])
        block_size, type_size = BLOCK_LAYOUT[info.ggml_type]
        raw = self.raw(name).view(rows, cols // block_size * type_size)  # a row of blocks each
        if dim == 0:
            raw, shape, skip = raw[start:stop], (stop - start, *info.shape[1:]), 0
        else:  # the blocks that cover the columns, then the columns cut out of them
            assert len(info.shape) == 2
            first, end = start // block_size, -(-stop // block_size)
            raw = raw[:, first * type_size : end * type_size]
            shape, skip = (rows, (end - first) * block_size), start - first * block_size
        try:
            w = dequantize(raw.contiguous().view(-1), info.ggml_type, shape)
        except GGUFError as e:
            raise GGUFError(f"{self.path}: tensor {name!r}: {e}") from e
        return w.narrow(dim, skip, stop - start).to(dtype)

    def close(self) -> None:
        """Drop the mapping; views already handed out keep their pages until they are freed."""
        self._data = None

    def __enter__(self) -> "GGUFFile":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _info(self, name: str) -> GGUFTensorInfo:
        if name not in self.tensors:
            raise GGUFError(f"{self.path}: no tensor named {name!r}")
        return self.tensors[name]


class _Cursor:
    """Reads the header front to back; every read is bounds-checked against the file size."""

    def __init__(self, path: Path, buf: memoryview) -> None:
        self.path, self.buf, self.pos = path, buf, 0

    def fail(self, message: str) -> GGUFError:
        return GGUFError(f"{self.path}: {message}")

    def need(self, n: int, what: str) -> None:
        left = len(self.buf) - self.pos
        if n > left:
            raise self.fail(
                f"{what} needs {n} bytes at offset {self.pos}, only {left} left (truncated file?)"
            )

    def unpack(self, fmt: str, what: str) -> tuple[Any, ...]:
        size = struct.calcsize("<" + fmt)
        self.need(size, what)
        values = struct.unpack_from("<" + fmt, self.buf, self.pos)
        self.pos += size
        return values

    def string(self, what: str) -> str:
        (n,) = self.unpack("Q", what)
        if n > MAX_STRING_BYTES:
            raise self.fail(f"{what}: string of {n} bytes is over the 1 GiB limit")
        self.need(n, f"{what}: string of {n} bytes")
        raw = self.buf[self.pos : self.pos + n]
        self.pos += n
        try:
            return str(raw, "utf-8")
        except UnicodeDecodeError as e:
            raise self.fail(f"{what}: string is not valid UTF-8 ({e.reason})") from e

    def value(self, vtype: int, what: str, depth: int = 0) -> Any:
        if vtype in _SCALAR_FORMATS:
            return self.unpack(_SCALAR_FORMATS[vtype], what)[0]
        if vtype == _STRING:
            return self.string(what)
        if vtype != _ARRAY:
            raise self.fail(f"{what}: unknown value type {vtype} (expected 0 to 12)")
        if depth == MAX_ARRAY_DEPTH:
            raise self.fail(f"{what}: arrays nested deeper than {MAX_ARRAY_DEPTH} levels")
        etype, n = self.unpack("IQ", what)
        if etype not in _MIN_SIZES:
            raise self.fail(f"{what}: array of unknown value type {etype} (expected 0 to 12)")
        limit = MAX_ARRAY_LEN if etype in _SCALAR_FORMATS else MAX_STRING_ARRAY_LEN
        if n > limit:
            raise self.fail(f"{what}: array of {n} elements is over the {limit} limit")
        self.need(n * _MIN_SIZES[etype], f"{what}: array of {n} elements")
        if etype in _SCALAR_FORMATS:  # one unpack for the whole array: fast for token_type
            return list(self.unpack(f"{n}{_SCALAR_FORMATS[etype]}", what))
        if etype == _STRING:
            return self.strings(n, what)
        return [self.value(etype, f"{what}[{i}]", depth + 1) for i in range(n)]

    def strings(self, n: int, what: str) -> list[str]:
        """An array of `n` strings, read in one tight loop: through `value`, one call chain
        per string, 10M empty strings took 12 s and 380 MB before any check."""
        buf, pos, end = self.buf, self.pos, len(self.buf)
        unpack = _U64.unpack_from
        out: list[str] = []
        append = out.append
        try:
            for _ in range(n):
                if end - pos < 8:
                    break
                (k,) = unpack(buf, pos)
                if k > end - pos - 8:
                    break
                append(str(buf[pos + 8 : pos + 8 + k], "utf-8"))
                pos += 8 + k
        except UnicodeDecodeError as e:
            raise self.fail(f"{what}[{len(out)}]: string is not valid UTF-8 ({e.reason})") from e
        self.pos = pos
        if len(out) < n:  # the file ended inside element i: the same error `string` gives
            self.string(f"{what}[{len(out)}]")
        return out


def read_gguf(path: str | os.PathLike) -> GGUFFile:
    """Parse and validate a GGUF file's header, metadata and tensor infos (not the weights)."""
    path = Path(path)
    if not path.is_file():
        raise GGUFError(f"{path}: no such file")
    try:
        # subtle: shared=False maps the file privately (copy-on-write): zero copy, and a caller
        # writing into a tensor can never modify the file.
        data = torch.from_file(str(path), shared=False, size=path.stat().st_size, dtype=torch.uint8)
    except (OSError, RuntimeError) as e:
        raise GGUFError(f"{path}: cannot map the file: {e}") from e
    cur = _Cursor(path, memoryview(data.numpy()))

    (magic,) = cur.unpack("4s", "magic")
    if magic != b"GGUF":
        raise cur.fail(f"bad magic {magic!r}, expected b'GGUF' (not a GGUF file)")
    (version,) = cur.unpack("I", "version")
    if version and version & 0xFFFF == 0:  # 3 written big-endian reads as 0x3000000
        raise cur.fail(f"version field reads {version:#x}: a big-endian GGUF file, not supported")
    if version not in (2, 3):
        raise cur.fail(f"unsupported GGUF version {version} (expected 2 or 3)")
    n_tensors, n_kv = cur.unpack("QQ", "header")
    cur.need(n_kv * _MIN_KV_BYTES, f"n_kv = {n_kv} key/value pairs")
    cur.need(n_tensors * _MIN_TENSOR_INFO_BYTES, f"n_tensors = {n_tensors} tensor infos")

    metadata = _read_metadata(cur, n_kv)
    alignment = _alignment(cur, metadata)
    tensors: dict[str, GGUFTensorInfo] = {}
    for i in range(n_tensors):
        info = _read_tensor_info(cur, i, alignment)
        if info.name in tensors:
            raise cur.fail(f"duplicate tensor name {info.name!r}")
        tensors[info.name] = info
    # offsets in the file are relative to the data section, which starts at the next aligned
    # byte; subtle: vocab-only files have no tensors and no padding, so it may lie past the end
    data_start = -(-cur.pos // alignment) * alignment
    tensors = {n: replace(t, offset=data_start + t.offset) for n, t in tensors.items()}
    _check_data_layout(cur, list(tensors.values()), len(cur.buf))
    return GGUFFile(path, version, alignment, metadata, tensors, data)


def _read_metadata(cur: _Cursor, n_kv: int) -> dict[str, Any]:
    metadata: dict[str, Any] = {}
    for i in range(n_kv):
        key = cur.string(f"metadata key {i}")
        if key in metadata:
            raise cur.fail(f"duplicate metadata key {key!r}")
        (vtype,) = cur.unpack("I", f"metadata key {key!r}")
        # subtle: ggml reads general.alignment as a u32; any other type is a malformed file
        if key == "general.alignment" and vtype != 4:
            raise cur.fail(f"general.alignment has value type {vtype}, expected 4 (uint32)")
        metadata[key] = cur.value(vtype, f"metadata key {key!r}")
    return metadata


def _alignment(cur: _Cursor, metadata: dict[str, Any]) -> int:
    alignment = metadata.get("general.alignment", DEFAULT_ALIGNMENT)
    if alignment == 0 or alignment & (alignment - 1):
        raise cur.fail(f"general.alignment = {alignment}, expected a power of two")
    return alignment


def _read_tensor_info(cur: _Cursor, i: int, alignment: int) -> GGUFTensorInfo:
    """One tensor info, validated; its offset is still relative to the data section."""
    name = cur.string(f"tensor {i} name")
    what = f"tensor {name!r}"
    (n_dims,) = cur.unpack("I", what)
    if not 1 <= n_dims <= MAX_DIMS:
        raise cur.fail(f"{what} has {n_dims} dimensions, expected 1 to {MAX_DIMS}")
    ne = cur.unpack(f"{n_dims}Q", what)
    # ne = 0 is allowed (an empty tensor), as in ggml
    if max(ne) > INT64_MAX or math.prod(ne) > INT64_MAX:
        raise cur.fail(f"{what} has dims {list(ne)}: the element count overflows int64")
    (raw_type,) = cur.unpack("I", what)
    try:
        ggml_type = GGMLType(raw_type)
    except ValueError as e:
        raise cur.fail(f"{what} has unknown ggml type {raw_type}") from e
    block_size, type_size = BLOCK_LAYOUT[ggml_type]
    if block_size > 1 and 0 in ne:  # empty float tensors exist in ggml; empty blocks do not
        raise cur.fail(f"{what} is a {ggml_type.name} tensor with no elements (dims {list(ne)})")
    if ne[0] % block_size:
        raise cur.fail(
            f"{what} has rows of {ne[0]} elements, "
            f"not a multiple of the {ggml_type.name} block size {block_size}"
        )
    (offset,) = cur.unpack("Q", what)
    if offset % alignment:
        raise cur.fail(f"{what} has data offset {offset}, not a multiple of alignment {alignment}")
    nbytes = math.prod(ne) // block_size * type_size
    return GGUFTensorInfo(name, tuple(reversed(ne)), ggml_type, offset, nbytes)


def _check_data_layout(cur: _Cursor, tensors: list[GGUFTensorInfo], file_size: int) -> None:
    """Every tensor's bytes lie inside the file and no two tensors share a byte."""
    previous = None
    for info in sorted(tensors, key=lambda t: t.offset):
        end = info.offset + info.nbytes
        if end > file_size:
            raise cur.fail(
                f"tensor {info.name!r} data [{info.offset}, {end}) "
                f"lies past the end of the file ({file_size} bytes)"
            )
        if previous is not None and info.offset < previous.offset + previous.nbytes:
            raise cur.fail(
                f"tensor {info.name!r} at offset {info.offset} overlaps tensor {previous.name!r}"
            )
        previous = info


def unpermute_qk(weight: torch.Tensor, n_head: int) -> torch.Tensor:
    """Undo llama.cpp's convert-time row permutation of a llama q_proj / k_proj weight (or bias).

    llama.cpp reorders each head's rows from HF's rotate-half rope layout (first half, second
    half) to its interleaved one (pairs); this puts them back so the weight matches HF's
    LlamaForCausalLM, exactly as transformers' GGUF loader does. Pass the number of heads this
    weight holds: n_head for q, n_kv_head for k.
    """
    rows = weight.shape[0]
    if rows % (2 * n_head):
        raise GGUFError(f"q/k weight of {rows} rows cannot split into {n_head} heads of 2 halves")
    head_dim = rows // n_head
    # (rows, ...) -> (n_head, head_dim/2, 2, ...): llama.cpp's pairs -> (n_head, 2, head_dim/2, ...)
    w = weight.reshape(n_head, head_dim // 2, 2, *weight.shape[1:])
    return w.transpose(1, 2).reshape(weight.shape)
