"""Malformed GGUF files: each must raise one clear GGUFError, fast, before allocating anything.

The files are built byte by byte with struct.pack (the layout is in tinyformers/loading/gguf.py).
Limits from the issue: each rejection within 1 s and under 100 MB of extra memory. The cases
follow llama.cpp's tests/test-gguf.cpp and ggml's gguf.cpp checks, plus the CVE-2025-53630
style huge counts and the 2^62-element array that hangs the `gguf` package.
(The "tensor shape the architecture does not expect" case belongs to the model loader.)
"""

import signal
import struct
import tempfile
import time
import tracemalloc
from pathlib import Path

import gguf
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tinyformers.errors import GGUFError
from tinyformers.loading.gguf import read_gguf

U8, U32, U64, STRING, ARRAY = 0, 4, 10, 8, 9  # metadata value types
F32, Q4_0 = 0, 2  # ggml types


def _str(s: str | bytes) -> bytes:
    b = s.encode() if isinstance(s, str) else s
    return struct.pack("<Q", len(b)) + b


def _kv(key: str | bytes, vtype: int, payload: bytes) -> bytes:
    return _str(key) + struct.pack("<I", vtype) + payload


def _info(name: str | bytes, ne: list[int], ggml_type: int = F32, offset: int = 0) -> bytes:
    dims = struct.pack(f"<I{len(ne)}Q", len(ne), *ne)
    return _str(name) + dims + struct.pack("<IQ", ggml_type, offset)


def _gguf(
    kvs: list[bytes] = (),
    infos: list[bytes] = (),
    data: bytes = b"",
    *,
    magic: bytes = b"GGUF",
    version: bytes = struct.pack("<I", 3),
    n_tensors: int | None = None,
    n_kv: int | None = None,
    alignment: int = 32,
) -> bytes:
    """A GGUF file; counts default to the real ones; with tensors, data starts aligned."""
    counts = (len(infos) if n_tensors is None else n_tensors, len(kvs) if n_kv is None else n_kv)
    head = magic + version + struct.pack("<QQ", *counts) + b"".join(kvs) + b"".join(infos)
    padding = bytes(-len(head) % alignment) if infos else b""  # as in vocab-only files
    return head + padding + data


# a valid file: one 2x4 float32 tensor (32 bytes) and one metadata key
GOOD_KV = _kv("general.architecture", STRING, _str("llama"))
GOOD_INFO = _info("w", [4, 2])
GOOD_DATA = struct.pack("<8f", *range(8))


def test_builder_makes_a_file_both_readers_accept(tmp_path):
    path = tmp_path / "good.gguf"
    path.write_bytes(_gguf([GOOD_KV], [GOOD_INFO], GOOD_DATA))
    reference = gguf.GGUFReader(path)
    with read_gguf(path) as f:
        assert f.metadata == {"general.architecture": "llama"}
        assert f.tensor("w").flatten().tolist() == reference.tensors[0].data.flatten().tolist()
        assert f.tensors["w"].shape == (2, 4)


def test_empty_tensor_is_accepted_as_in_ggml(tmp_path):
    path = tmp_path / "empty.gguf"
    path.write_bytes(_gguf([], [_info("e", [0, 3])]))
    assert gguf.GGUFReader(path).tensors[0].n_elements == 0  # the reference accepts it too
    with read_gguf(path) as f:
        assert f.tensors["e"].nbytes == 0 and f.tensor("e").shape == (3, 0)


def _deep_array(depth: int) -> bytes:
    """An array nested `depth` levels (array of array of ... of one u8)."""
    payload = struct.pack("<IQ", U8, 1) + b"\x07"
    for _ in range(depth - 1):
        payload = struct.pack("<IQ", ARRAY, 1) + payload
    return payload


def _overlapping() -> bytes:
    infos = [_info("a", [8]), _info("b", [8], offset=0)]  # both at offset 0, 32 bytes each
    return _gguf([], infos, bytes(64))


def _alignment_kv(value: int, vtype: int = U32) -> bytes:
    fmt = "<I" if vtype == U32 else "<Q"
    return _kv("general.alignment", vtype, struct.pack(fmt, value))


CASES = [
    pytest.param(lambda: b"", r"magic needs 4 bytes", id="empty file"),
    pytest.param(lambda: _gguf(magic=b"GGML"), r"bad magic b'GGML'", id="bad magic"),
    pytest.param(
        lambda: _gguf(version=struct.pack("<I", 1)), r"unsupported GGUF version 1", id="version 1"
    ),
    pytest.param(
        lambda: _gguf(version=struct.pack("<I", 4)), r"unsupported GGUF version 4", id="version 4"
    ),
    pytest.param(
        lambda: _gguf(version=struct.pack("<I", 0)), r"unsupported GGUF version 0", id="version 0"
    ),
    pytest.param(lambda: _gguf(version=struct.pack(">I", 3)), r"big-endian", id="big-endian"),
    pytest.param(lambda: _gguf()[:20], r"header needs 16 bytes at offset 8", id="truncated header"),
    pytest.param(lambda: _gguf(n_kv=2**62), r"n_kv = 4611686018427387904 .* needs", id="huge n_kv"),
    pytest.param(
        lambda: _gguf(n_tensors=2**62),
        r"n_tensors = 4611686018427387904 .* needs",
        id="huge n_tensors",
    ),
    pytest.param(
        lambda: _gguf([GOOD_KV], n_kv=5),
        r"n_kv = 5 key/value pairs needs 65 bytes",
        id="n_kv past end",
    ),
    pytest.param(
        lambda: _gguf([struct.pack("<Q", 1000) + bytes(16)]),
        r"metadata key 0: string of 1000 bytes needs 1000 bytes at offset 32, only 16 left",
        id="key past end",
    ),
    pytest.param(
        lambda: _gguf([struct.pack("<Q", 2**30 + 1) + bytes(8)]),
        r"metadata key 0: string of 1073741825 bytes is over the 1 GiB limit",
        id="key over 1 GiB",
    ),
    pytest.param(
        lambda: _gguf([struct.pack("<Q", 2**64 - 1) + bytes(8)]),
        r"over the 1 GiB limit",
        id="key length 2^64-1",
    ),
    pytest.param(
        lambda: _gguf([_kv("s", STRING, struct.pack("<Q", 100))]),
        r"metadata key 's': string of 100 bytes needs 100 bytes",
        id="string value past end",
    ),
    pytest.param(
        lambda: _gguf([_kv("s", STRING, struct.pack("<Q", 2**40))]),
        r"metadata key 's': string of 1099511627776 bytes is over the 1 GiB limit",
        id="string value over 1 GiB",
    ),
    pytest.param(
        lambda: _gguf([_kv(b"\xff\xfe", U8, b"\x00")]),
        r"metadata key 0: string is not valid UTF-8",
        id="key not UTF-8",
    ),
    pytest.param(
        lambda: _gguf([_kv("a", ARRAY, struct.pack("<IQ", U32, 1000))]),
        r"metadata key 'a': array of 1000 elements needs 4000 bytes",
        id="array past end",
    ),
    pytest.param(
        lambda: _gguf([_kv("a", ARRAY, struct.pack("<IQ", STRING, 1000))]),
        r"array of 1000 elements needs 8000 bytes",
        id="string array past end",
    ),
    pytest.param(
        lambda: _gguf([_kv("a", ARRAY, struct.pack("<IQ", U8, 2**62))]),
        r"array of 4611686018427387904 elements is over the 16777216 limit",
        id="array of 2^62",
    ),
    pytest.param(
        lambda: _gguf(
            [_kv("a", ARRAY, struct.pack("<IQ", STRING, 1) + struct.pack("<Q", 50) + bytes(10))]
        ),
        r"metadata key 'a'\[0\]: string of 50 bytes needs 50 bytes",
        id="array element past end",
    ),
    pytest.param(
        lambda: _gguf([_kv("a", ARRAY, struct.pack("<IQ", 13, 1))]),
        r"metadata key 'a': array of unknown value type 13",
        id="array type unknown",
    ),
    pytest.param(
        lambda: _gguf([_kv("a", ARRAY, _deep_array(5))]),
        r"metadata key 'a'\[0\]\[0\]\[0\]\[0\]: arrays nested deeper than 4 levels",
        id="arrays nested too deep",
    ),
    pytest.param(
        lambda: _gguf([_kv("v", 13, b"\x00" * 8)]),
        r"metadata key 'v': unknown value type 13",
        id="value type unknown",
    ),
    pytest.param(
        lambda: _gguf([GOOD_KV, GOOD_KV]),
        r"duplicate metadata key 'general.architecture'",
        id="duplicate key",
    ),
    pytest.param(
        lambda: _gguf([_alignment_kv(0)]),
        r"general.alignment = 0, expected a power of two",
        id="alignment 0",
    ),
    pytest.param(
        lambda: _gguf([_alignment_kv(48)]),
        r"general.alignment = 48, expected a power of two",
        id="alignment 48",
    ),
    pytest.param(
        lambda: _gguf([_alignment_kv(32, U64)]),
        r"general.alignment has value type 10, expected 4",
        id="alignment not u32",
    ),
    pytest.param(
        lambda: _gguf([], [GOOD_INFO, _info("w", [4], offset=32)], bytes(64)),
        r"duplicate tensor name 'w'",
        id="duplicate tensor name",
    ),
    pytest.param(
        lambda: _gguf([], [_info(b"\xc3", [4])], bytes(16)),
        r"tensor 0 name: string is not valid UTF-8",
        id="tensor name not UTF-8",
    ),
    pytest.param(
        lambda: _gguf([], [_info("w", [])], bytes(32)),
        r"tensor 'w' has 0 dimensions, expected 1 to 4",
        id="0 dims",
    ),
    pytest.param(
        lambda: _gguf([], [_info("w", [1, 1, 1, 1, 1])], bytes(32)),
        r"tensor 'w' has 5 dimensions, expected 1 to 4",
        id="5 dims",
    ),
    pytest.param(
        lambda: _gguf([], [_info("w", [2**32, 2**32])]),
        r"tensor 'w' has dims \[4294967296, 4294967296\]: the element count overflows int64",
        id="dims product overflows",
    ),
    pytest.param(
        lambda: _gguf([], [_info("w", [2**63])]),
        r"element count overflows int64",
        id="dim over int64",
    ),
    pytest.param(
        lambda: _gguf([], [_info("w", [0, 2**64 - 1])]),
        r"element count overflows int64",
        id="dims with 0 still checked",
    ),
    pytest.param(
        lambda: _gguf([], [_info("w", [32], ggml_type=99)], bytes(128)),
        r"tensor 'w' has unknown ggml type 99",
        id="unknown ggml type",
    ),
    pytest.param(
        lambda: _gguf([], [_info("w", [32], ggml_type=4)], bytes(128)),
        r"tensor 'w' has unknown ggml type 4",
        id="retired ggml type",
    ),
    pytest.param(
        lambda: _gguf([], [_info("w", [33, 2], ggml_type=Q4_0)], bytes(64)),
        r"tensor 'w' has rows of 33 elements, not a multiple of the Q4_0 block size 32",
        id="row not a block multiple",
    ),
    pytest.param(
        lambda: _gguf([], [_info("w", [4], offset=4)], bytes(64)),
        r"tensor 'w' has data offset 4, not a multiple of alignment 32",
        id="offset not aligned",
    ),
    pytest.param(
        lambda: _gguf([], [_info("w", [1024])], bytes(32)),
        r"tensor 'w' data \[\d+, \d+\) lies past the end of the file",
        id="data past end",
    ),
    pytest.param(
        lambda: _gguf([], [_info("w", [4], offset=2**63)], bytes(32)),
        r"tensor 'w' data \[\d+, \d+\) lies past the end",
        id="offset past end",
    ),
    pytest.param(
        lambda: _gguf([], [_info("w", [2**40, 2**20])], bytes(32)),
        r"tensor 'w' data .* lies past the end",
        id="huge tensor",
    ),
    pytest.param(
        _overlapping,
        r"tensor '[ab]' at offset \d+ overlaps tensor '[ab]'",
        id="overlapping tensors",
    ),
]


def _assert_rejected_fast_and_small(path, match: str) -> GGUFError:
    def hung(*_: object) -> None:
        raise TimeoutError("read_gguf did not return within 5 s")

    signal.signal(signal.SIGALRM, hung)
    signal.setitimer(signal.ITIMER_REAL, 5)  # a hang fails the test instead of the suite
    tracemalloc.start()
    try:
        start = time.perf_counter()
        with pytest.raises(GGUFError, match=match) as raised:
            read_gguf(path)
        elapsed = time.perf_counter() - start
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
        signal.setitimer(signal.ITIMER_REAL, 0)
    assert elapsed < 1.0  # the limit: 1 s
    assert peak < 100 * 2**20  # the limit: 100 MB of extra memory
    message = str(raised.value)
    assert message.startswith(f"{path}: ") and "\n" not in message  # one line naming the file
    return raised.value


@pytest.mark.parametrize(("build", "match"), CASES)
def test_malformed_file_raises_one_clear_error(tmp_path, build, match):
    path = tmp_path / "bad.gguf"
    path.write_bytes(build())
    _assert_rejected_fast_and_small(path, match)


def test_missing_file_and_directory_are_clear_errors(tmp_path):
    with pytest.raises(GGUFError, match="no such file"):
        read_gguf(tmp_path / "nope.gguf")
    with pytest.raises(GGUFError, match="no such file"):
        read_gguf(tmp_path)


def test_file_cut_anywhere_is_rejected(tmp_path):
    kvs = [GOOD_KV, _kv("a", ARRAY, struct.pack("<IQ", U32, 2) + bytes(8))]
    whole = _gguf(kvs, [GOOD_INFO], GOOD_DATA)
    header_end = 24 + len(b"".join(kvs)) + len(GOOD_INFO)  # then padding, then the data
    path = tmp_path / "cut.gguf"
    for cut in range(len(whole)):
        path.write_bytes(whole[:cut])
        # inside the header a read runs out of bytes; past it, the tensor data does
        match = (
            r"needs \d+ bytes at offset \d+, only \d+ left" if cut < header_end else "past the end"
        )
        error = _assert_rejected_fast_and_small(path, match)
        assert str(path) in str(error)


# a valid file touching every parser path: strings, a string array, a nested array, a scalar,
# a float tensor and a quantized one
FUZZ_BASE = _gguf(
    [
        GOOD_KV,
        _kv("t", ARRAY, struct.pack("<IQ", STRING, 2) + _str("ab") + _str("c")),
        _kv("n", ARRAY, struct.pack("<IQ", ARRAY, 1) + struct.pack("<IQ", U32, 1) + bytes(4)),
        _kv("general.alignment", U32, struct.pack("<I", 32)),
    ],
    [GOOD_INFO, _info("q", [32], ggml_type=Q4_0, offset=32)],
    GOOD_DATA + bytes(18),
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    edits=st.lists(
        st.tuples(st.integers(0, len(FUZZ_BASE) - 1), st.integers(0, 255)), min_size=1, max_size=4
    )
)
def test_corrupted_bytes_load_or_raise_gguf_error_only(edits):
    """Random byte edits (type ids, counts, lengths, offsets) never escape as another error."""
    data = bytearray(FUZZ_BASE)
    for position, value in edits:
        data[position] = value
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "fuzz.gguf"
        path.write_bytes(data)
        try:
            with read_gguf(path) as f:
                for name in f.tensors:
                    f.tensor(name)  # a file that loads must also decode
        except GGUFError as e:
            assert "\n" not in str(e)
