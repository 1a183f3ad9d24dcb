"""pytorch_model.bin files (zip or legacy pickle), checked before torch reads a byte of data.

`torch.load(weights_only=True)` refuses code, but it still trusts the sizes a file states:
a stride-0 view of 2^24 x 2^24 over one element, a storage key the file never stores (torch
hands out uninitialized memory as weights), a compressed zip entry that inflates a thousand
times, quantized or sparse tensors the model code cannot use. So the pickle is first replayed
by `_Inspector`, an unpickler that knows a handful of names and builds no tensor: it returns
what each tensor claims (storage, offset, shape, stride), and those claims are checked against
the bytes the file really holds. Only then does torch load the file (memory-mapped if zip).
"""

from __future__ import annotations

import io
import math
import mmap
import pickle
import struct
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch

from tinyformers.errors import CheckpointError

# torch's storage classes by pickled name -> bytes per element. Quantized storages (QInt8...)
# are absent on purpose: the model code has no use for them.
STORAGE_ITEMSIZE = {
    "DoubleStorage": 8,
    "FloatStorage": 4,
    "HalfStorage": 2,
    "BFloat16Storage": 2,
    "LongStorage": 8,
    "IntStorage": 4,
    "ShortStorage": 2,
    "CharStorage": 1,
    "ByteStorage": 1,
    "BoolStorage": 1,
}
_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_LEGACY_PROTOCOL = 1001


@dataclass
class _Storage:
    key: str
    itemsize: int
    numel: int


@dataclass
class _TensorClaim:
    storage: _Storage
    offset: int
    size: tuple
    stride: tuple


class _Dict(dict):
    """OrderedDict stand-in; a dict subclass so `_metadata` set by BUILD has a place to go."""


def _rebuild_tensor(storage, offset, size, stride, *_):
    return _TensorClaim(storage, offset, tuple(size), tuple(stride))


def _rebuild_parameter(data, *_):
    return data


def _rebuild_from_type(func, _new_type, args, _state):
    return func(*args)


_ALLOWED = {
    ("collections", "OrderedDict"): _Dict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("torch._tensor", "_rebuild_from_type_v2"): _rebuild_from_type,
    ("torch", "Size"): tuple,
}


class _Inspector(pickle._Unpickler):
    """Replays a pickle with stand-ins: tensors become `_TensorClaim`s, storages `_Storage`s.

    subtle: the pure-Python unpickler on purpose. The C one keeps its memo in an array, so
    one LONG_BINPUT 1175087203 opcode (10 bytes) makes it allocate and zero 9 GB.
    """

    def __init__(self, file, path: Path, storages: dict[str, _Storage] | None = None) -> None:
        super().__init__(file)
        self.path = path
        self.storages = {} if storages is None else storages

    def load_bytearray8(self) -> None:
        """subtle: the pure-Python unpickler makes bytearray(n) before it reads, so one
        BYTEARRAY8 with a huge n allocates GBs (a fuzz finding: 13.7 GB, 30 s); read first,
        which the file's own size bounds."""
        (n,) = struct.unpack("<Q", self.read(8))
        data = self.read(n)
        if len(data) != n:
            raise CheckpointError(f"{self.path}: pickle truncated (a bytearray of {n} bytes)")
        self.append(bytearray(data))

    def load_build(self) -> None:
        """subtle: BUILD sets attributes from any dict it is given; torch gives one only to an
        OrderedDict, its `_metadata`. Any other (`{"values": 1}`) would shadow a dict method
        where the state dict is read, and end in a TypeError there."""
        state, target = self.stack[-1], self.stack[-2]
        if not (
            isinstance(target, _Dict) and isinstance(state, dict) and state.keys() <= {"_metadata"}
        ):
            raise CheckpointError(
                f"{self.path}: refused: the pickle sets {state!r:.80} on a "
                f"{type(target).__name__} (only an OrderedDict's _metadata)"
            )
        super().load_build()

    dispatch = {
        **pickle._Unpickler.dispatch,
        pickle.BYTEARRAY8[0]: load_bytearray8,
        pickle.BUILD[0]: load_build,
    }

    def find_class(self, module: str, name: str):
        if (module, name) in _ALLOWED:
            return _ALLOWED[module, name]
        if module == "torch" and name in STORAGE_ITEMSIZE:
            return STORAGE_ITEMSIZE[name]
        raise CheckpointError(
            f"{self.path}: refused: the pickle needs {module}.{name} (only plain tensors load; "
            "no code, no quantized or sparse tensors)"
        )

    def persistent_load(self, pid):
        # zip: ('storage', type, key, location, numel); legacy adds view metadata
        if not (isinstance(pid, tuple) and len(pid) in (5, 6) and pid[0] == "storage"):
            raise CheckpointError(f"{self.path}: unknown persistent id {pid!r:.80}")
        itemsize, key, numel = pid[1], str(pid[2]), pid[4]
        if not isinstance(itemsize, int) or not _natural(numel):
            raise CheckpointError(f"{self.path}: storage {key}: bad type or size {pid!r:.80}")
        storage = self.storages.setdefault(key, _Storage(key, itemsize, numel))
        if (storage.itemsize, storage.numel) != (itemsize, numel):
            raise CheckpointError(f"{self.path}: storage {key} is declared with two sizes")
        view = pid[5] if len(pid) == 6 else None
        if view is None:
            return storage
        view_key, offset, view_numel = view
        if not (_natural(offset) and _natural(view_numel) and offset + view_numel <= numel):
            raise CheckpointError(f"{self.path}: storage view {view_key} lies outside {key}")
        return _Storage(str(view_key), itemsize, view_numel)  # offsets inside it start at 0


def load_torch_pickle(path: Path) -> dict[str, torch.Tensor]:
    """A pytorch_model.bin, zip (memory-mapped) or legacy format, holding only tensors."""
    try:
        is_zip = zipfile.is_zipfile(path)  # subtle: raises BadZipFile on some broken zips
        _check_zip(path) if is_zip else _check_legacy(path)
    except CheckpointError:
        raise
    except Exception as e:  # the pickle machinery's own errors on a malformed stream
        raise CheckpointError(
            f"{path}: not a readable PyTorch checkpoint ({_first_line(e)})"
        ) from e
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=is_zip)
    except Exception as e:  # truncated zip, bad magic, EOF in the middle of a pickle ...
        raise CheckpointError(
            f"{path}: not a readable PyTorch checkpoint ({_first_line(e)})"
        ) from e
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path}: expected a dict of tensors")
    return state


def _check_zip(path: Path) -> None:
    """Stored (uncompressed) entries only, so no entry can inflate; every storage the pickle
    names is an entry of exactly its size; every tensor lies inside its storage."""
    with zipfile.ZipFile(path) as z:
        entries = {info.filename: info for info in z.infolist()}
        if compressed := [i.filename for i in entries.values() if i.compress_type]:
            raise CheckpointError(
                f"{path}: refused: entry {compressed[0]} is compressed (torch.save never "
                "compresses; a compressed entry can inflate without bound)"
            )
        pickles = [name for name in entries if name.endswith("/data.pkl")]
        if len(pickles) != 1:
            raise CheckpointError(f"{path}: expected one data.pkl in the zip, found {len(pickles)}")
        prefix = pickles[0].removesuffix("data.pkl")
        inspector = _Inspector(io.BytesIO(z.read(pickles[0])), path)  # stored: its own size
        _check_state(inspector.load(), path)
        for storage in inspector.storages.values():
            entry = entries.get(f"{prefix}data/{storage.key}")
            if entry is None:
                raise CheckpointError(f"{path}: storage {storage.key} is not in the file")
            if entry.file_size != storage.numel * storage.itemsize:
                raise CheckpointError(
                    f"{path}: storage {storage.key} holds {entry.file_size} bytes, "
                    f"the pickle says {storage.numel * storage.itemsize}"
                )


def _check_legacy(path: Path) -> None:
    """The pre-1.6 format: magic, protocol, system info, the state pickle, the list of storage
    keys, then each storage as an 8-byte element count and its bytes."""
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        # subtle: an mmap's read(n) stops at the end; a file's read(n) would first allocate n
        # bytes, whatever length a hostile pickle opcode states.
        if _Inspector(mm, path).load() != _LEGACY_MAGIC:
            raise CheckpointError(f"{path}: not a PyTorch checkpoint (bad magic number)")
        if _Inspector(mm, path).load() != _LEGACY_PROTOCOL:
            raise CheckpointError(f"{path}: unsupported legacy protocol version")
        _Inspector(mm, path).load()  # system info: byte order, type sizes
        inspector = _Inspector(mm, path)
        _check_state(inspector.load(), path)
        keys = _Inspector(mm, path).load()
        if not isinstance(keys, list):
            raise CheckpointError(f"{path}: storage key list is missing")
        storages = {k: s for k, s in inspector.storages.items()}
        for key in keys:
            storage = storages.pop(str(key), None)
            if storage is None:
                raise CheckpointError(f"{path}: stores storage {key} that no tensor uses")
            if len(mm) - mm.tell() < 8:
                raise CheckpointError(f"{path}: storage {key} is cut off (truncated file?)")
            (numel,) = struct.unpack("<q", mm.read(8))
            nbytes = numel * storage.itemsize
            if numel != storage.numel or nbytes > len(mm) - mm.tell():
                raise CheckpointError(
                    f"{path}: storage {key} stores {numel} elements, the pickle says "
                    f"{storage.numel} (or the file ends first)"
                )
            mm.seek(nbytes, 1)
        if storages:  # torch would hand out uninitialized memory as these weights
            raise CheckpointError(f"{path}: storage {next(iter(storages))} is not in the file")


def _check_state(state, path: Path) -> None:
    """A dict of tensors (or {"state_dict": ...}), each inside its storage."""
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: expected a dict of tensors")
    for name, claim in state.items():
        if not isinstance(claim, _TensorClaim):
            raise CheckpointError(f"{path}: entry {name!r:.80} is not a tensor")
        size, stride, offset = claim.size, claim.stride, claim.offset
        if not (
            len(size) == len(stride)
            and all(map(_natural, (*size, *stride, offset)))
            and isinstance(claim.storage, _Storage)
        ):
            raise CheckpointError(f"{path}: tensor {name!r:.80}: bad shape or strides")
        numel = math.prod(size)
        last = offset + sum((n - 1) * s for n, s in zip(size, stride, strict=True)) if numel else 0
        # numel bounded too: a stride-0 view of one element could otherwise claim 2^48 of them
        if last >= max(claim.storage.numel, 1) or numel > claim.storage.numel:
            raise CheckpointError(
                f"{path}: tensor {name!r:.80} of shape {list(size)} does not fit its storage "
                f"of {claim.storage.numel} elements"
            )


def _natural(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 2**62


def _first_line(e: Exception) -> str:
    return str(e).splitlines()[0] if str(e) else type(e).__name__
