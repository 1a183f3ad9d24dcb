"""Hostile checkpoint folders and files: each refused with one error of a named class, within
1 s and 100 MB over the memory before the case (tests/hostile.py measures both in a child).

The classes follow issue 13: malformed JSON, files that are not regular files, shard names
that leave the folder, pickles that pass `weights_only` but lie about their sizes, sizes that
no file backs, and config values of the wrong type or range.
"""

from __future__ import annotations

import json
import os
import pickle
import struct
import warnings
import zipfile
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch
from hostile import assert_refused, run_cases, tiny_gpt2_weights

from tinyformers.errors import CheckpointError, GGUFError, TokenizerError

GPT2 = {"model_type": "gpt2", "vocab_size": 8, "n_positions": 16, "n_embd": 8, "n_layer": 1}
GPT2["n_head"] = 2
LLAMA = {
    "model_type": "llama",
    "vocab_size": 8,
    "hidden_size": 8,
    "intermediate_size": 16,
    "num_hidden_layers": 1,
    "num_attention_heads": 2,
}
GEMMA3 = LLAMA | {"model_type": "gemma3_text", "num_key_value_heads": 1, "head_dim": 4}
GGUF_TOKENIZER = {
    "tokenizer.ggml.model": "gpt2",
    "tokenizer.ggml.pre": "gpt-2",
    "tokenizer.ggml.tokens": [*"abcdefg", "ab"],
    "tokenizer.ggml.merges": ["a b"],
}


def _folder(root: Path, name: str, config: str | dict | None = None) -> Path:
    folder = root / name
    folder.mkdir()
    if config is not None:
        text = config if isinstance(config, str) else json.dumps(config)
        (folder / "config.json").write_text(text)
    return folder


def _tiny_gpt2_weights(folder: Path, n_layer: int = 1) -> None:
    """Random weights in our own names for GPT2 (loads through `sanitize` unchanged)."""
    from safetensors.torch import save_file

    w = tiny_gpt2_weights(8, GPT2["n_embd"], n_positions=16, n_layer=n_layer)
    save_file(w, folder / "model.safetensors")


class _Claim:
    """Pickles as torch's own tensor record, with whatever storage, shape and stride we say."""

    def __init__(self, key: str, numel: int, size: tuple, stride: tuple) -> None:
        self.key, self.numel, self.size, self.stride = key, numel, size, stride

    def __reduce__(self):
        storage = _StorageRef(self.key, self.numel)
        args = (storage, 0, self.size, self.stride, False, OrderedDict())
        return torch._utils._rebuild_tensor_v2, args


class _StorageRef:
    def __init__(self, key: str, numel: int) -> None:
        self.key, self.numel = key, numel


class _LegacyPickler(pickle.Pickler):
    def persistent_id(self, obj):
        if isinstance(obj, _StorageRef):
            return ("storage", torch.FloatStorage, obj.key, "cpu", obj.numel, None)
        return None


def _legacy_file(path: Path, claims: dict[str, _Claim], stored: dict[str, int]) -> None:
    """The pre-1.6 torch.save format, written by hand: `stored` maps key -> elements written."""
    with open(path, "wb") as f:
        for header in (0x1950A86A20F9469CFC6C, 1001, {"little_endian": True}):
            pickle.dump(header, f, protocol=2)
        _LegacyPickler(f, protocol=2).dump(claims)
        pickle.dump(list(stored), f, protocol=2)
        for numel in stored.values():
            f.write(struct.pack("<q", numel) + bytes(4 * numel))


def _zip_bomb(path: Path) -> None:
    """A torch zip whose one storage entry is deflated: 256 MB of zeros in ~250 KB."""
    torch.save({"w": torch.zeros(1)}, path)
    with zipfile.ZipFile(path) as z:
        entries = {i.filename: z.read(i) for i in z.infolist()}
    with zipfile.ZipFile(path, "w") as z:
        for name, data in entries.items():
            if name.endswith("/data/0"):
                info = zipfile.ZipInfo(name)
                info.compress_type = zipfile.ZIP_DEFLATED
                with z.open(info, "w", force_zip64=True) as f:
                    for _ in range(64):
                        f.write(bytes(4 * 2**20))
            else:
                z.writestr(name, data)


def _gguf_llama(path: Path, block_count: int, metadata: dict | None = None) -> None:
    """A Llama GGUF of 2 tensors (too few to load), with `metadata` added."""
    import gguf

    writer = gguf.GGUFWriter(str(path), "llama")
    for key, value in (metadata or {}).items():
        if isinstance(value, list):
            writer.add_array(key, value)
        elif isinstance(value, str):
            writer.add_string(key, value)
        else:
            writer.add_uint32(key, value)
    writer.add_block_count(block_count)
    writer.add_vocab_size(8)
    writer.add_embedding_length(8)
    writer.add_feed_forward_length(16)
    writer.add_head_count(2)
    writer.add_context_length(16)
    writer.add_tensor("token_embd.weight", np.zeros((8, 8), dtype=np.float32))
    writer.add_tensor("blk.0.attn_norm.weight", np.ones(8, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _safetensors(path: Path, header: bytes | dict, data: bytes = b"") -> None:
    text = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + data)


def _build(root: Path) -> dict[str, tuple[str, type, str]]:
    """Hostile files under `root`; case name -> (code run in the child, error, message regex)."""
    load = "tinyformers.load({!r})"
    cases: dict[str, tuple[str, type, str]] = {}

    def case(name, target, match, error=CheckpointError, code=load):
        cases[name] = (code.format(str(target)), error, match)

    # -- malformed JSON, in each file we read --------------------------------------------
    case("deep_json_config", _folder(root, "deep", "[" * 100_000), "nested too deeply")
    long_int = '{"n_layer": 1' + "0" * 5000 + "}"
    case("5000_digit_int_config", _folder(root, "digits", long_int), "integer of 5001 digits")
    header = b'{"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4' + b"0" * 5000 + b"]}}"
    folder = _folder(root, "st_digits", GPT2)
    (folder / "model.safetensors").write_bytes(struct.pack("<Q", len(header)) + header + bytes(4))
    case("5000_digit_int_safetensors", folder, r"model.safetensors: header: .*digits")
    folder = _folder(root, "index_deep", GPT2)
    (folder / "model.safetensors.index.json").write_text('{"weight_map": ' + "[" * 50_000)
    case("deep_json_index", folder, "index.json: JSON nested too deeply")

    # -- files that are not regular files ------------------------------------------------
    folder = _folder(root, "fifo")
    os.mkfifo(folder / "config.json")
    case("fifo_config", folder, "config.json: not a regular file")
    folder = _folder(root, "devzero")
    (folder / "config.json").symlink_to("/dev/zero")
    case("dev_zero_config", folder, "config.json: not a regular file")

    # -- shard names that leave the folder -----------------------------------------------
    (root / "outside.safetensors").write_bytes(b"")
    for name, shard in (("dotdot", "../outside.safetensors"), ("absolute", "/etc/passwd")):
        folder = _folder(root, f"shard_{name}", GPT2)
        index = {"weight_map": {"wte.weight": "model.safetensors", "wpe.weight": shard}}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index))
        case(f"shard_name_{name}", folder, "is not a file name in this folder")

    # -- pickles that pass weights_only ---------------------------------------------------
    read = "from tinyformers.loading.torch_pickle import load_torch_pickle\nload_torch_pickle(Path({!r}))"  # noqa: E501
    stride0 = torch.zeros(1).as_strided((2**24, 2**24), (0, 0))
    torch.save({"w": stride0}, root / "stride0.bin")
    case("stride_0_view_2^48_elements", root / "stride0.bin", "does not fit its storage", code=read)
    claims = {"w": _Claim("0", 1, (4, 4), (4, 1))}  # 16 elements over a storage of 1
    _legacy_file(root / "past_storage.bin", claims, {"0": 1})
    case("elements_past_storage", root / "past_storage.bin", "does not fit its storage", code=read)
    claims = {"a": _Claim("0", 2, (2,), (1,)), "b": _Claim("1", 2, (2,), (1,))}
    _legacy_file(root / "missing_storage.bin", claims, {"0": 2})  # storage 1 never written
    case(
        "legacy_missing_storage",
        root / "missing_storage.bin",
        "storage 1 is not in the file",
        code=read,
    )  # noqa: E501
    _zip_bomb(root / "bomb.bin")
    case("zip_bomb", root / "bomb.bin", "is compressed", code=read)
    with warnings.catch_warnings():  # quantized tensors are deprecated: all the more reason
        warnings.simplefilter("ignore")
        quantized = torch.quantize_per_tensor(torch.randn(4), 0.1, 0, torch.qint8)
    torch.save({"w": quantized}, root / "quantized.bin")
    case("quantized_tensor", root / "quantized.bin", "refused: .*_rebuild_qtensor", code=read)
    torch.save({"w": torch.eye(4).to_sparse()}, root / "sparse.bin")
    case("sparse_tensor", root / "sparse.bin", "refused: .*sparse", code=read)
    (root / "code.bin").write_bytes(pickle.dumps({"w": _RunsCode()}, protocol=2))
    case("pickle_that_calls_a_function", root / "code.bin", "refused: .*print", code=read)
    # BYTEARRAY8 of 16 GB in 10 bytes: Python's unpickler would allocate it before reading
    (root / "bytearray.bin").write_bytes(b"\x80\x05\x96" + struct.pack("<Q", 2**34) + b".")
    case("pickle_bytearray8_of_16_gb", root / "bytearray.bin", "truncated", code=read)

    # -- sizes no file backs ----------------------------------------------------------------
    folder = _folder(root, "layers", GPT2 | {"n_layer": 100_000})
    _tiny_gpt2_weights(folder)
    case(
        "config_with_10^5_layers", folder, "asks for 100000 layers, the weights hold tensors for 1"
    )
    _gguf_llama(root / "layers.gguf", 100_000, GGUF_TOKENIZER)
    case("gguf_with_10^5_layers", root / "layers.gguf", "asks for 100000 layers")
    # a per-layer list built from the config (Gemma 3's layer kinds) before the weights are
    # counted: the fuzzer's 2^31 layers made one of 16 GB
    folder = _folder(root, "gemma_layers", GEMMA3 | {"num_hidden_layers": 2**31 - 1})
    _tiny_gpt2_weights(folder)
    case("gemma3_config_with_2^31_layers", folder, "asks for 2147483647 layers")
    qwen2 = LLAMA | {"model_type": "qwen2", "use_sliding_window": True}  # windows from layer 28
    folder = _folder(root, "qwen2_layers", qwen2 | {"num_hidden_layers": 2**31 - 1})
    _tiny_gpt2_weights(folder)
    case("qwen2_config_with_2^31_layers", folder, "asks for 2147483647 layers")
    # RoPE's speeds computed at build time, before the weights are checked: the fuzzer's
    # hidden_size 10^9 (head_dim 5 * 10^8) took 11 s and 5.7 GB
    folder = _folder(root, "huge_head_dim", LLAMA | {"hidden_size": 10**9})
    _tiny_gpt2_weights(folder)
    case("llama_config_with_head_dim_5x10^8", folder, "missing tensor")

    # -- issue 26: bulk parsing bounded by counts, the format's rules, no traceback ----------
    _safetensors(root / "tiny_tensors.safetensors", b"{" + b",".join(
        b'"%d":{"dtype":"F32","shape":[0],"data_offsets":[0,0]}' % i for i in range(10**6)
    ) + b"}")  # fmt: skip
    read_st = "from tinyformers.loading.safetensors import load_safetensors\nload_safetensors({!r})"
    case("safetensors_10^6_tiny_tensors", root / "tiny_tensors.safetensors",
         "header lists over 65536 tensors", code=read_st)  # fmt: skip
    _safetensors(root / "shape.safetensors", {"w": {"dtype": "F32", "shape": [2**70, 0],
                                                    "data_offsets": [0, 0]}})  # fmt: skip
    case("safetensors_shape_2^70", root / "shape.safetensors", "bad shape", code=read_st)
    w = b'{"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}'
    _safetensors(root / "twice.safetensors", b'{"w": %s, "w": %s}' % (w, w), bytes(4))
    case("safetensors_duplicate_key", root / "twice.safetensors", "'w' appears twice",
         code=read_st)  # fmt: skip
    _safetensors(root / "gap.safetensors", {"w": {"dtype": "F32", "shape": [1],
                                                  "data_offsets": [4, 8]}}, bytes(8))  # fmt: skip
    case("safetensors_gap", root / "gap.safetensors", "leaves a gap", code=read_st)
    header = json.dumps({"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}})
    _safetensors(root / "utf16.safetensors", header.encode("utf-16"), bytes(4))
    case("safetensors_utf16_header", root / "utf16.safetensors", "not UTF-8", code=read_st)
    torch.save(_OrderedDictWithValues(), root / "values.bin")
    case("pickle_ordered_dict_values_1", root / "values.bin", r"refused: .*\{'values': 1\}",
         code=read)  # fmt: skip
    strings = struct.pack("<Q", 1) + b"a" + struct.pack("<IIQ", 9, 8, 10**7) + bytes(8 * 10**7)
    (root / "strings.gguf").write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + strings)
    read_gguf = "from tinyformers.loading.gguf import read_gguf\nread_gguf({!r})"
    case("gguf_10^7_empty_strings", root / "strings.gguf", "array of 10000000 elements is over",
         GGUFError, read_gguf)  # fmt: skip

    # -- issue 26: the small files before the first weight byte ---------------------------
    _gguf_llama(root / "bos.gguf", 1, GGUF_TOKENIZER | {"tokenizer.ggml.bos_token_id": 10**6})
    case("gguf_bos_outside_vocab_before_weights", root / "bos.gguf",
         "bos token id 1000000 is outside", TokenizerError)  # fmt: skip
    _gguf_llama(root / "template.gguf", 1, GGUF_TOKENIZER | {"tokenizer.chat_template": [1, 2]})
    case("gguf_template_not_string_before_weights", root / "template.gguf",
         "chat template is not a string", TokenizerError)  # fmt: skip
    folder = _folder(root, "bos_folder", GPT2)
    nan = tiny_gpt2_weights(8, GPT2["n_embd"], n_positions=16) | {
        "wte.weight": torch.full((8, 8), torch.nan)
    }  # noqa: E501
    from safetensors.torch import save_file

    save_file(nan, folder / "model.safetensors")  # the weights would fail: NaN
    (folder / "vocab.json").write_text(json.dumps({c: i for i, c in enumerate("abcdefgh")}))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    (folder / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<nope>"}))
    case("folder_bos_not_in_vocab_before_weights", folder, "bos_token '<nope>' is not in",
         TokenizerError)  # fmt: skip

    # -- silent acceptance: a Q4_K tensor with no elements ----------------------------------
    name = b"blk.0.ffn_down.weight"
    info = struct.pack("<Q", len(name)) + name + struct.pack("<I2QIQ", 2, 256, 0, 12, 0)
    (root / "empty_q4k.gguf").write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 1, 0) + info)
    case("gguf_q4_k_with_no_elements", root / "empty_q4k.gguf", "Q4_K tensor with no elements",
         GGUFError, read_gguf)  # fmt: skip

    # -- config values of the wrong type or range ----------------------------------------
    for name, base, key, value, match in (
        ("n_head_0", GPT2, "n_head", 0, "n_head = 0: expected an integer from 1"),
        ("n_layer_true", GPT2, "n_layer", True, "n_layer = True: expected an integer"),
        (
            "eps_nan",
            GPT2,
            "layer_norm_epsilon",
            "NaN",
            "layer_norm_epsilon = nan: expected a finite",
        ),  # noqa: E501
        (
            "flag_string_false",
            GPT2,
            "scale_attn_weights",
            "false",
            "scale_attn_weights = 'false': expected true or false",
        ),  # noqa: E501
        ("rope_theta_0", LLAMA, "rope_theta", 0, "rope_theta = 0: expected a finite number > 0"),
        (
            "rope_scaling_string",
            LLAMA,
            "rope_scaling",
            "linear",
            "rope_scaling = 'linear': expected a JSON object",
        ),  # noqa: E501
        (
            "rope_scaling_no_factor",
            LLAMA,
            "rope_scaling",
            {"rope_type": "llama3"},
            "rope_scaling.factor = None",
        ),  # noqa: E501
        (
            "context_10^13",
            LLAMA,
            "max_position_embeddings",
            10**13,
            "max_position_embeddings = 10000000000000",
        ),  # noqa: E501
        ("odd_head_dim", LLAMA, "head_dim", 3, r"head_dim = 3 .*: expected an even number"),
        (
            "no_head_dim",
            LLAMA,
            "num_attention_heads",
            16,
            "head_dim = 0 .*hidden_size 8 // num_attention_heads 16",
        ),  # noqa: E501
        ("required_missing", GPT2, "n_embd", None, "field 'n_embd' is missing"),
    ):
        config = json.dumps(base | {key: value}).replace('"NaN"', "NaN")
        case(f"config_{name}", _folder(root, f"config_{name}", config), match)
    return cases


class _RunsCode:
    def __reduce__(self):
        return print, ("this must never print",)


class _OrderedDictWithValues:
    """Pickles as an OrderedDict of one tensor whose BUILD sets `values` = 1: shadowing the
    dict method made the reader fail with a TypeError traceback."""

    def __reduce__(self):
        return OrderedDict, (), {"values": 1}, None, iter([("w", torch.zeros(2))])


@pytest.fixture(scope="module")
def hostile(tmp_path_factory) -> dict[str, tuple[dict, type, str]]:
    cases = _build(tmp_path_factory.mktemp("hostile"))
    results = run_cases({name: code for name, (code, _, _) in cases.items()})
    return {name: (results[name], error, match) for name, (_, error, match) in cases.items()}


CASES = [
    "deep_json_config", "5000_digit_int_config", "5000_digit_int_safetensors", "deep_json_index",
    "fifo_config", "dev_zero_config", "shard_name_dotdot", "shard_name_absolute",
    "stride_0_view_2^48_elements", "elements_past_storage", "legacy_missing_storage", "zip_bomb",
    "quantized_tensor", "sparse_tensor", "pickle_that_calls_a_function",
    "pickle_bytearray8_of_16_gb",
    "config_with_10^5_layers", "gguf_with_10^5_layers", "gemma3_config_with_2^31_layers",
    "qwen2_config_with_2^31_layers", "llama_config_with_head_dim_5x10^8",
    "gguf_q4_k_with_no_elements", "config_n_head_0",
    "safetensors_10^6_tiny_tensors", "safetensors_shape_2^70", "safetensors_duplicate_key",
    "safetensors_gap", "safetensors_utf16_header", "pickle_ordered_dict_values_1",
    "gguf_10^7_empty_strings", "gguf_bos_outside_vocab_before_weights",
    "gguf_template_not_string_before_weights", "folder_bos_not_in_vocab_before_weights",
    "config_n_layer_true", "config_eps_nan", "config_flag_string_false",
    "config_rope_theta_0", "config_rope_scaling_string", "config_rope_scaling_no_factor",
    "config_context_10^13", "config_odd_head_dim", "config_no_head_dim", "config_required_missing",
]  # fmt: skip


@pytest.mark.parametrize("name", CASES)
def test_hostile_file_is_refused_fast_and_small(hostile, name):
    result, error, match = hostile[name]
    assert_refused(result, error, match)


def test_every_built_case_is_checked(hostile):
    assert sorted(hostile) == sorted(CASES)
