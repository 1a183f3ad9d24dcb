"""Mutation fuzzing of every parser a stranger's files reach, on seeds made from real files.

Each target turns one input (a dict of file name -> bytes) into files in a scratch folder and
runs one loader on them. An input passes when the loader returns or raises a TinyformersError,
within 1 s and within 100 MB of peak memory over the input's own size; anything else (another
exception, a slow or large input) is a finding, saved with its traceback under --out.

Targets and their seeds:
    gguf            a 1-layer Llama GGUF with SmolLM2's metadata, vocab and template (trimmed),
                    tensors in F32, F16, Q8_0, Q4_0, Q4_1 -> read_gguf, its tokenizer, the model
    safetensors     small files written by the `safetensors` package -> load_safetensors
    pickle          torch.save files, zip and legacy -> load_torch_pickle
    tokenizer_json  GPT-2's vocab and merges as a tokenizer.json (trimmed) -> load + encode
    vocab_merges    GPT-2's vocab.json + merges.txt (trimmed) and side files -> load + encode
    config          GPT-2 and SmolLM2 configs (shrunk) with matching weights -> load + generate
    chat_template   SmolLM2's template and others from the Hub -> render_chat
    template_filters  templates that build values with size-producing filters and operators
                    (sum, tojson, string, join, indent, %, format ...) -> render_chat
    pre_tokenizer   tokenizer.json pipelines (Split regexes, Digits, ByteLevel, added tokens)
                    on a byte-level vocabulary -> load + encode a few KB of mixed text
    load            whole small folders (config, weights, tokenizer, template, generation
                    config) of GPT-2 and Llama -> tinyformers.load, a prompt, a chat turn

Mutations: bit flips, random bytes, inserted/deleted/duplicated ranges, boundary integers
(0, -1, 2^31, 2^63, 2^64 - 1 ...) written over any offset, truncation, splicing two seeds; for
JSON, a value anywhere in the tree replaced by a hostile one (huge, negative, wrong type,
"false", NaN, deep nesting); for templates, Jinja snippets that loop, multiply or recurse, and
(template_filters) expressions composed of large values and the filters that grow them; for
pre-tokenizers, a Split regex swapped for a hostile one or a step added; for folders, a file
dropped or taken from the other seed.

Usage:
    python -m benchmarks.fuzz --target gguf --seconds 600
    python -m benchmarks.fuzz --seconds 20          # every target, one after the other
    python -m benchmarks.fuzz --target load --seconds 600 --seed 7   # a long run
Prints one JSON line per target: runs, seconds, findings, slowest input, largest peak.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

import tinyformers
from tinyformers.errors import TinyformersError

SECONDS, MEGABYTES = 1.0, 100
ROOT = Path(__file__).resolve().parents[1]
Input = dict[str, bytes]


# -- seeds ------------------------------------------------------------------------------------


def _gpt2_files(n_merges: int = 600) -> tuple[dict[str, int], list[str]]:
    """GPT-2's real vocab and merges, cut to the first `n_merges` merges, ids made dense."""
    sys.path.insert(0, str(ROOT / "tests"))
    from conftest import GPT2_DATA

    from tinyformers.tokenizers.bpe import bytes_to_unicode

    vocab = json.loads((GPT2_DATA / "vocab.json").read_text())
    lines = (GPT2_DATA / "merges.txt").read_text().splitlines()[1 : n_merges + 1]
    keep = list(bytes_to_unicode().values())
    keep += ["".join(line.split(" ")) for line in lines]
    keep = sorted(dict.fromkeys(keep), key=lambda t: vocab[t]) + ["<|endoftext|>"]
    return {t: i for i, t in enumerate(keep)}, lines


def _smollm2_metadata(n_tokens: int = 600) -> dict:
    from tinyformers.loading.gguf import read_gguf
    from tinyformers.loading.hub import default_model

    with read_gguf(default_model()) as g:
        m = dict(g.metadata)
    tokens = m["tokenizer.ggml.tokens"][:n_tokens]
    known = set(tokens)
    merges = [x for x in m["tokenizer.ggml.merges"] if {*x.split(" "), x.replace(" ", "")} <= known]
    m["tokenizer.ggml.tokens"] = tokens
    m["tokenizer.ggml.token_type"] = m["tokenizer.ggml.token_type"][:n_tokens]
    m["tokenizer.ggml.merges"] = merges
    return m


def _gguf_seed(path: Path) -> None:
    """SmolLM2's metadata on a 1-layer, 32-wide Llama with one tensor of each common type."""
    import gguf

    m = _smollm2_metadata()
    w = gguf.GGUFWriter(str(path), "llama")
    for key, value in m.items():
        if key.startswith(("tokenizer.", "general.name", "general.license")):
            if isinstance(value, str):
                w.add_string(key, value)
            elif isinstance(value, bool):
                w.add_bool(key, value)
            elif isinstance(value, int):
                w.add_uint32(key, value)
            elif isinstance(value, list):
                w.add_array(key, value)
    w.add_block_count(1)
    w.add_context_length(64)
    w.add_embedding_length(32)
    w.add_feed_forward_length(64)
    w.add_head_count(2)
    w.add_head_count_kv(1)
    w.add_rope_freq_base(100000.0)
    w.add_layer_norm_rms_eps(1e-5)
    n = len(m["tokenizer.ggml.tokens"])
    Q = gguf.GGMLQuantizationType
    rng = np.random.default_rng(0)
    for name, shape, kind in (
        ("token_embd.weight", (n, 32), Q.Q8_0), ("blk.0.attn_norm.weight", (32,), Q.F32),
        ("blk.0.attn_q.weight", (32, 32), Q.Q4_1), ("blk.0.attn_k.weight", (16, 32), Q.Q8_0),
        ("blk.0.attn_v.weight", (16, 32), Q.F32), ("blk.0.attn_output.weight", (32, 32), Q.F16),
        ("blk.0.ffn_norm.weight", (32,), Q.F32), ("blk.0.ffn_gate.weight", (64, 32), Q.Q4_0),
        ("blk.0.ffn_up.weight", (64, 32), Q.Q8_0), ("blk.0.ffn_down.weight", (32, 64), Q.Q4_1),
        ("output_norm.weight", (32,), Q.F32),
    ):  # fmt: skip
        data = rng.standard_normal(shape).astype(np.float32)
        if kind == Q.F16:
            w.add_tensor(name, data.astype(np.float16))
        elif kind == Q.F32:
            w.add_tensor(name, data)
        else:
            w.add_tensor(name, gguf.quants.quantize(data, kind), raw_dtype=kind)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def _tiny_gpt2_weights(vocab_size: int) -> dict[str, torch.Tensor]:
    c = 8
    w = {"wte.weight": torch.randn(vocab_size, c), "wpe.weight": torch.randn(16, c)}
    w |= {"ln_f.weight": torch.ones(c), "ln_f.bias": torch.zeros(c)}
    for name, shape in {
        "ln_1.weight": (c,), "ln_1.bias": (c,), "ln_2.weight": (c,), "ln_2.bias": (c,),
        "attn.c_attn.weight": (c, 3 * c), "attn.c_attn.bias": (3 * c,),
        "attn.c_proj.weight": (c, c), "attn.c_proj.bias": (c,),
        "mlp.c_fc.weight": (c, 4 * c), "mlp.c_fc.bias": (4 * c,),
        "mlp.c_proj.weight": (4 * c, c), "mlp.c_proj.bias": (c,),
    }.items():  # fmt: skip
        w[f"h.0.{name}"] = torch.randn(shape)
    return w


def _tiny_llama_weights(vocab_size: int) -> dict[str, torch.Tensor]:
    w = {
        "model.embed_tokens.weight": torch.randn(vocab_size, 8),
        "model.norm.weight": torch.ones(8),
    }
    for name, shape in {
        "self_attn.q_proj.weight": (8, 8), "self_attn.k_proj.weight": (4, 8),
        "self_attn.v_proj.weight": (4, 8), "self_attn.o_proj.weight": (8, 8),
        "mlp.gate_proj.weight": (16, 8), "mlp.up_proj.weight": (16, 8),
        "mlp.down_proj.weight": (8, 16), "input_layernorm.weight": (8,),
        "post_attention_layernorm.weight": (8,),
    }.items():  # fmt: skip
        w[f"model.layers.0.{name}"] = torch.randn(shape)
    return w


def _file_bytes(write: Callable[[Path], None]) -> bytes:
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "f"
        write(path)
        return path.read_bytes()


def seeds(target: str) -> list[Input]:
    """The seed corpus of `target`, built from the real files the tests use."""
    from safetensors.torch import save_file

    torch.manual_seed(0)
    if target == "gguf":
        return [{"model.gguf": _file_bytes(_gguf_seed)}]
    if target == "safetensors":
        tensors = [_tiny_gpt2_weights(16), {"a": torch.arange(6, dtype=torch.int64).view(2, 3)}]
        tensors.append({"e": torch.zeros(0, 4), "h": torch.ones(3, dtype=torch.bfloat16)})
        return [{"model.safetensors": _file_bytes(lambda p, t=t: save_file(t, p))} for t in tensors]
    if target == "pickle":
        state = {"w": torch.randn(3, 4), "b": torch.arange(4), "h": torch.ones(2).half()}
        state["view"] = state["w"][1]
        zip_file = _file_bytes(lambda p: torch.save(state, p))
        legacy = _file_bytes(lambda p: torch.save(state, p, _use_new_zipfile_serialization=False))
        return [{"pytorch_model.bin": zip_file}, {"pytorch_model.bin": legacy}]
    if target in ("tokenizer_json", "vocab_merges"):
        vocab, merges = _gpt2_files()
        if target == "vocab_merges":
            side = {"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>"}
            return [
                {
                    "vocab.json": json.dumps(vocab).encode(),
                    "merges.txt": ("#version: 0.2\n" + "\n".join(merges)).encode(),
                    "tokenizer_config.json": json.dumps(side | {"add_bos_token": False}).encode(),
                    "generation_config.json": json.dumps(
                        {"eos_token_id": [len(vocab) - 1]}
                    ).encode(),
                }
            ]
        pre = {"type": "Sequence", "pretokenizers": [
            {"type": "Digits", "individual_digits": True},
            {"type": "ByteLevel", "add_prefix_space": False, "use_regex": True},
        ]}  # fmt: skip
        data = {
            "added_tokens": [{"id": len(vocab) - 1, "content": "<|endoftext|>", "special": True}],
            "normalizer": None,
            "pre_tokenizer": pre,
            "decoder": {"type": "ByteLevel"},
            "model": {"type": "BPE", "vocab": vocab, "merges": merges, "ignore_merges": False},
        }
        return [{"tokenizer.json": json.dumps(data).encode()}]
    if target == "config":
        sys.path.insert(0, str(ROOT / "tests"))
        from conftest import gpt2_config_dict

        gpt2 = gpt2_config_dict(n_layer=1, n_embd=8, n_head=2, n_positions=16, vocab_size=16)
        gpt2 |= {"bos_token_id": 15, "eos_token_id": 15}  # the real 50256, inside 16 tokens
        llama = {
            "model_type": "llama", "vocab_size": 16, "hidden_size": 8, "intermediate_size": 16,
            "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1,
            "max_position_embeddings": 64, "rms_norm_eps": 1e-5, "rope_theta": 100000.0,
            "tie_word_embeddings": True, "bos_token_id": 1, "eos_token_id": 2,
            "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                             "high_freq_factor": 4.0, "original_max_position_embeddings": 32},
        }  # fmt: skip
        return [
            {
                "config.json": json.dumps(config).encode(),
                "model.safetensors": _file_bytes(lambda p, w=weights: save_file(w, p)),
            }
            for config, weights in (
                (gpt2, _tiny_gpt2_weights(16)),
                (llama, _tiny_llama_weights(16)),
            )
        ]
    if target == "chat_template":
        sys.path.insert(0, str(ROOT / "tests"))
        import test_chat

        templates = [_smollm2_metadata(10)["tokenizer.chat_template"]]
        templates += [test_chat.LLAMA3, test_chat.MISTRAL, test_chat.ZEPHYR, test_chat.FEATURES]
        return [{"chat_template.jinja": t.encode()} for t in templates]
    if target == "template_filters":
        return [{"filters.jinja": t.encode()} for t in FILTER_TEMPLATES]
    if target == "pre_tokenizer":
        return [{"tokenizer.json": json.dumps(_byte_level_tokenizer(p)).encode()}
                for p in PRE_TOKENIZERS]  # fmt: skip
    if target == "load":
        return _folder_seeds()
    raise ValueError(f"unknown target {target!r}")


FILTER_TEMPLATES = [  # each renders, and grows values the way hostile ones do, but within bounds
    "{% set l = messages|map(attribute='content')|list %}{{ ([l] * 3)|sum(start=[])|join(', ') }}"
    "{{ messages|tojson(indent=2) }}{{ (messages|string)[:20] }}",
    "{% for m in messages %}{{ '%-10s|%5d' % (m.role, loop.index) }}{{ m.content|indent(2) }}"
    "{{ '{:>8}'.format(m.role) ~ m.content|wordwrap(5)|upper }}{% endfor %}",
    "{{ (messages * 4)|map(attribute='role')|unique|join('/') }}{{ tools|tojson }}"
    "{{ messages|first|pprint|length }}{{ '%s' % (messages|last).content|center(40) }}",
]
PRE_TOKENIZERS = [
    [{"type": "Digits", "individual_digits": True}, "BYTE_LEVEL"],
    [{"type": "Split", "pattern": {"Regex": r"\p{N}{1,3}"}, "behavior": "Isolated"}, "BYTE_LEVEL"],
    [{"type": "Split", "pattern": {"Regex": r"(?i:'s|'t)|[^\r\n\p{L}\p{N}]?\p{L}+|\s+"},
      "behavior": "Isolated"}, {"type": "Digits", "individual_digits": False}, "BYTE_LEVEL"],
    [{"type": "Split", "pattern": {"String": "<sep>"}, "behavior": "Isolated"}, "BYTE_LEVEL"],
]  # fmt: skip
PRE_TOKENIZER_TEXT = (
    ("Hello world! 12345 naïve café 😀 <sep> <x> " * 20) + "a" * 300 + "1" * 300 + " \n\t" * 100
)


def _byte_level_tokenizer(steps: list) -> dict:
    """A tokenizer.json of the 256 byte tokens and a few merges, with `steps` before ByteLevel."""
    from tinyformers.tokenizers.bpe import bytes_to_unicode

    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "use_regex": True}
    tokens = list(bytes_to_unicode().values())
    merges = ["Ġ t", "h e", "l l", "1 2", "a a"]
    vocab = {t: i for i, t in enumerate(tokens + ["Ġt", "he", "ll", "12", "aa"])}
    added = [{"id": len(vocab), "content": "<x>", "special": False},
             {"id": len(vocab) + 1, "content": "<|end|>", "special": True}]  # fmt: skip
    steps = [byte_level if step == "BYTE_LEVEL" else step for step in steps]
    return {
        "model": {
            "type": "BPE",
            "vocab": vocab | {"<x>": len(vocab), "<|end|>": len(vocab) + 1},
            "merges": merges,
        },  # fmt: skip
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": steps},
        "decoder": {"type": "ByteLevel"},
        "added_tokens": added,
    }


def _folder_seeds() -> list[Input]:
    """Two small folders as a model ships: GPT-2's trimmed vocab.json + merges.txt with a
    1-layer network, and a Llama with a tokenizer.json, a chat template and generation config."""
    from safetensors.torch import save_file

    vocab, merges = _gpt2_files(60)
    n = len(vocab)
    sys.path.insert(0, str(ROOT / "tests"))
    from conftest import gpt2_config_dict

    gpt2 = gpt2_config_dict(n_layer=1, n_embd=8, n_head=2, n_positions=16, vocab_size=n)
    gpt2 |= {"bos_token_id": n - 1, "eos_token_id": n - 1}
    llama = {
        "model_type": "llama", "vocab_size": n, "hidden_size": 8, "intermediate_size": 16,
        "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1,
        "max_position_embeddings": 64, "rms_norm_eps": 1e-5, "rope_theta": 100000.0,
        "tie_word_embeddings": True, "bos_token_id": 0, "eos_token_id": n - 1,
    }  # fmt: skip
    tokenizer = json.loads(seeds("tokenizer_json")[0]["tokenizer.json"])
    tokenizer["model"] |= {"vocab": vocab, "merges": merges}
    tokenizer["added_tokens"] = [{"id": n - 1, "content": "<|endoftext|>", "special": True}]
    template = _smollm2_metadata(10)["tokenizer.chat_template"]
    side = {"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>", "add_bos_token": False}
    weights = {"gpt2": _tiny_gpt2_weights(n), "llama": _tiny_llama_weights(n)}
    return [
        {
            "config.json": json.dumps(gpt2).encode(),
            "model.safetensors": _file_bytes(lambda p: save_file(weights["gpt2"], p)),
            "vocab.json": json.dumps(vocab).encode(),
            "merges.txt": ("#version: 0.2\n" + "\n".join(merges)).encode(),
            "tokenizer_config.json": json.dumps(side).encode(),
        },
        {
            "config.json": json.dumps(llama).encode(),
            "model.safetensors": _file_bytes(lambda p: save_file(weights["llama"], p)),
            "tokenizer.json": json.dumps(tokenizer).encode(),
            "tokenizer_config.json": json.dumps(side | {"chat_template": template}).encode(),
            "generation_config.json": json.dumps({"eos_token_id": [n - 1, 0]}).encode(),
        },
    ]


# -- targets ----------------------------------------------------------------------------------

MESSAGES = [  # no system message: Mistral's template refuses one
    {"role": "user", "content": "Hello <|im_end|> world 123"},
    {"role": "assistant", "content": "Hi."},
    {"role": "user", "content": "And?"},
]
TEXT = "Hello world! 12345 naïve café 😀 <|endoftext|>  tabs\tand\nnewlines"
TOOLS = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]


def run_target(target: str, folder: Path) -> None:
    """Run `target`'s loader on the files in `folder`."""
    from tinyformers.chat import encode_chat, render_chat
    from tinyformers.loading.gguf import read_gguf
    from tinyformers.loading.safetensors import load_safetensors
    from tinyformers.loading.torch_pickle import load_torch_pickle
    from tinyformers.tokenizers import from_gguf_metadata, load_tokenizer

    if target == "gguf":
        with read_gguf(folder / "model.gguf") as g:
            for name in list(g.tensors)[:4]:
                g.tensor(name)
            tok = from_gguf_metadata(g.metadata, "model.gguf")
        tok.decode(tok.encode(TEXT, allowed_special="all"))
        model = tinyformers.load(folder / "model.gguf")
        model.generate_ids([0, 1], 2, temperature=0)
    elif target == "safetensors":
        load_safetensors(folder / "model.safetensors")
    elif target == "pickle":
        load_torch_pickle(folder / "pytorch_model.bin")
    elif target in ("tokenizer_json", "vocab_merges"):
        tok = load_tokenizer(folder)
        tok.decode(tok.encode(TEXT))
        tok.encode(TEXT, allowed_special="all")
    elif target == "config":
        model = tinyformers.load(folder)
        model.generate_ids([[0, 1], [2]], 2, temperature=0.7, seed=0)
    elif target == "chat_template":
        template = (folder / "chat_template.jinja").read_bytes().decode("utf-8", "replace")
        render_chat(template, MESSAGES, bos_token="<s>", eos_token="</s>")
    elif target == "template_filters":
        template = (folder / "filters.jinja").read_bytes().decode("utf-8", "replace")
        render_chat(template, MESSAGES, tools=TOOLS, bos_token="<s>", eos_token="</s>")
    elif target == "pre_tokenizer":
        tok = load_tokenizer(folder)
        tok.decode(tok.encode(PRE_TOKENIZER_TEXT))
        tok.encode(PRE_TOKENIZER_TEXT, allowed_special="all")
    elif target == "load":
        model = tinyformers.load(folder)
        model.generate("Hello 12", 2, temperature=0)
        if model.tokenizer.chat_template is not None:
            encode_chat(model.tokenizer, MESSAGES)


# -- mutations --------------------------------------------------------------------------------

BOUNDARY = [0, 1, 2, 7, 8, 31, 32, 255, 256, 2**15, 2**16 - 1, 2**31 - 1, 2**31, 2**32 - 1,
            2**32, 2**62, 2**63 - 1, 2**64 - 1]  # fmt: skip
HOSTILE_VALUES = [0, -1, 1, 10**9, 2**31, 2**63, 10**19, 1e308, -1e-300, 0.0, float("nan"),
                  float("inf"), "", "false", "a" * 1000, True, False, None, [], {}, [1, 2],
                  {"a": 1}, "../x", "/etc/passwd", [[[[[[[[[[]]]]]]]]]]]  # fmt: skip
_DEEP = "\u0000deep"  # stands for 5,000 nested arrays, written in after json.dumps
JINJA_SNIPPETS = [
    "{% for i in range(99999) %}{% for j in range(99999) %}{% endfor %}{% endfor %}",
    "{{ 'a' * 999999999 }}", "{{ [1] * 99999 * 99999 }}", "{{ 2 ** 99999999 }}",
    "{% macro m(n) %}{{ m(n) }}{% endmacro %}{{ m(1) }}", "{{ 1 / 0 }}", "{{ x.y.z }}",
    "{{ messages[99] }}", "{{ 'a'|center(999999999) }}", "{{ '%999999999d'|format(1) }}",
    "{% set ns = namespace(s='ab') %}{% for i in range(64) %}{% set ns.s = ns.s ~ ns.s %}"
    "{% endfor %}", "{{ ''.__class__ }}", "{{ raise_exception('x') }}", "{{ messages|tojson }}",
    "{{ (messages|first).content.replace('', 'ab' * 99999) }}", "{% if %}", "{{",
]  # fmt: skip
# template_filters: expressions built from a large value and 1 to 3 growing steps
LARGE_VALUES = [
    "([1] * 1000000)", "('ab' * 2000000)", "([messages] * 1000)", "(range(100000)|list)",
    "('\\n' * 1000000)", "({'k': 'v' * 1000000})", "([[1, 2]] * 100000)", "messages",
    "([('x' * 1000)] * 4000)", "(tools * 10000)",
]  # fmt: skip
GROWING_STEPS = [
    "|sum(start=[])", "|tojson", "|tojson(indent=1000000)", "|string", "|join", "|pprint",
    "|join('ab' * 1000)", "|indent(1000000)", "|indent('\\t' * 100000, true)", "|wordwrap(1)",
    "|center(4000000)", "|upper", "|e", "|list", "|map('string')|join", "|unique|list",
    "|sort", "|format", "|batch(3)|list", "|replace('a', 'aa' * 1000)", " * 30", " ~ 'x'",
    " + [1]", "|map('tojson')|list", "|dictsort", "|items|list", "|slice(1000)|list",
]  # fmt: skip
WRAPPERS = [
    "'%*s' % (4000000, {})", "'{{:>4000000}}'.format({})", "'%s%s' % ({}, {})",
    "[{}] * 30", "({}|string).expandtabs(100000)", "'x'.join({})", "{} * 1000",
]  # fmt: skip


def mutate(inp: Input, corpus: list[Input], rng: random.Random) -> Input:
    out = dict(inp)
    name = rng.choice(list(out))
    if len(out) > 1 and rng.random() < 0.1:  # a folder: a file dropped, or the other seed's
        other = rng.choice(corpus)
        if name in other and rng.random() < 0.5:
            out[name] = other[name]
        else:
            del out[name]
        return out
    data = out[name]
    for _ in range(rng.choice((1, 1, 1, 2, 4))):
        if name.endswith(".json") and rng.random() < 0.6:
            data = _mutate_json(data, rng)
        elif name == "filters.jinja" and rng.random() < 0.7:
            at = rng.randrange(len(data) + 1)
            data = data[:at] + _growing_expression(rng).encode() + data[at:]
        elif name == "tokenizer.json" and rng.random() < 0.3:
            data = _mutate_pre_tokenizer(data, rng)
        elif name.endswith(".jinja") and rng.random() < 0.5:
            at = rng.randrange(len(data) + 1)
            data = data[:at] + rng.choice(JINJA_SNIPPETS).encode() + data[at:]
        else:
            data = _mutate_bytes(data, corpus, name, rng)
    out[name] = data
    return out


def _growing_expression(rng: random.Random) -> str:
    """`{{ ... }}` of a large value through 1 to 3 steps that grow it, maybe in a wrapper."""
    expr = rng.choice(LARGE_VALUES)
    for _ in range(rng.randint(1, 3)):
        expr = f"({expr}{rng.choice(GROWING_STEPS)})"
    if rng.random() < 0.3:
        expr = rng.choice(WRAPPERS).replace("{}", expr)
    return "{{ " + expr + " }}"


HOSTILE_REGEXES = [
    "(a|aa)+$", "(a+)+b", "(\\p{L}|\\p{Ll})+$", "(?:\\s*\\d)*x", "a{1000}", "a{1001}",
    "(?<=a{0,100})b", "\\p{N}", ".", "", "(", "(?P<x>a)(?P=x)+$", "[^\\s]+", "(?:(?:a*)*)*$",
    "(.*)*!", "\\X+", "(?r)\\w+", "(?V1)[[a-z]--[aeiou]]+", "a" * 3000,
]  # fmt: skip


def _mutate_pre_tokenizer(data: bytes, rng: random.Random) -> bytes:
    """A tokenizer.json's pre-tokenizer changed: a Split regex swapped for a hostile one, a step
    added, or many added tokens."""
    try:
        tree = json.loads(data)
        steps = tree["pre_tokenizer"]["pretokenizers"]
        vocab = tree["model"]["vocab"]
    except (ValueError, RecursionError, KeyError, TypeError):
        return data
    if not isinstance(steps, list) or not isinstance(vocab, dict):
        return data
    op = rng.randrange(3)
    split = {"type": "Split", "pattern": {"Regex": rng.choice(HOSTILE_REGEXES)},
             "behavior": "Isolated"}  # fmt: skip
    if op == 0 and steps:
        steps[rng.randrange(len(steps))] = split
    elif op == 1:
        steps.insert(rng.randrange(len(steps) + 1), rng.choice([
            split, {"type": "Digits", "individual_digits": rng.random() < 0.5}
        ]))  # fmt: skip
    elif isinstance(tree.get("added_tokens") or [], list):
        count = rng.choice((10, 1000, 10_000))  # 100k: ~2 s a matcher (robustness.md)
        added = [{"id": len(vocab) + i, "content": f"a{i}" * rng.randint(1, 3),
                  "special": rng.random() < 0.5} for i in range(count)]  # fmt: skip
        tree["added_tokens"] = (tree.get("added_tokens") or []) + added
    return json.dumps(tree).encode()


def _mutate_bytes(data: bytes, corpus: list[Input], name: str, rng: random.Random) -> bytes:
    b = bytearray(data)
    op = rng.randrange(8)
    at = rng.randrange(len(b) + 1)
    if op == 0 and b:  # flip a bit
        b[min(at, len(b) - 1)] ^= 1 << rng.randrange(8)
    elif op == 1 and b:  # random bytes
        for _ in range(rng.randint(1, 8)):
            b[rng.randrange(len(b))] = rng.randrange(256)
    elif op == 2:  # a boundary integer over any offset, as u8 .. u64
        size = rng.choice((1, 2, 4, 8))
        value = rng.choice(BOUNDARY) % (1 << (8 * size))
        b[at : at + size] = value.to_bytes(size, "little")
    elif op == 3:  # insert random bytes
        b[at:at] = rng.randbytes(rng.choice((1, 4, 16, 256)))
    elif op == 4:  # delete a range
        del b[at : at + rng.choice((1, 8, 64, 4096))]
    elif op == 5:  # duplicate a range
        stop = min(len(b), at + rng.choice((8, 64, 1024)))
        b[at:at] = b[at:stop]
    elif op == 6:  # truncate
        del b[rng.randrange(len(b) + 1) :]
    else:  # splice with another seed's file of the same name
        other = rng.choice(corpus).get(name, b"")
        cut = rng.randrange(len(other) + 1)
        b = b[:at] + bytearray(other[cut:])
    return bytes(b)


def _mutate_json(data: bytes, rng: random.Random) -> bytes:
    try:
        tree = json.loads(data)
    except (ValueError, RecursionError):
        return data
    paths = []

    def walk(node, path, depth):
        paths.append(path)
        if depth > 6 or len(paths) > 5000:
            return
        items = (
            node.items()
            if isinstance(node, dict)
            else enumerate(node)
            if isinstance(node, list)
            else ()
        )  # noqa: E501
        for k, v in list(items)[:200]:
            walk(v, (*path, k), depth + 1)

    walk(tree, (), 0)
    path = rng.choice(paths)
    value = rng.choice(HOSTILE_VALUES)
    if rng.random() < 0.05:
        value = _DEEP if rng.random() < 0.5 else 10**100  # 101 digits
    if not path:
        return json.dumps(value).replace(json.dumps(_DEEP), "[" * 5000 + "]" * 5000).encode()
    parent = tree
    for k in path[:-1]:
        parent = parent[k]
    if isinstance(parent, dict) and rng.random() < 0.15:
        del parent[path[-1]]
    else:
        parent[path[-1]] = value
    try:
        text = json.dumps(tree)
    except (ValueError, RecursionError):
        return data
    return text.replace(json.dumps(_DEEP), "[" * 5000 + "]" * 5000, 1).encode()


# -- the loop ---------------------------------------------------------------------------------


def _status(key: str) -> int:
    with open("/proc/self/status") as f:
        return int(next(line for line in f if line.startswith(key)).split()[1]) * 1024


def _on_alarm(signum, frame):
    raise TimeoutError("input ran past the fuzzer's alarm")


def fuzz(target: str, seconds: float, out: Path, seed: int = 0) -> dict:
    """Fuzz `target` for `seconds`; the summary, findings saved under `out`."""
    rng = random.Random(seed)
    corpus = seeds(target)
    signal.signal(signal.SIGALRM, _on_alarm)
    work = Path(tempfile.mkdtemp(prefix=f"fuzz-{target}-"))
    summary = {"target": target, "runs": 0, "findings": 0, "errors": {}, "max_seconds": 0.0,
               "max_megabytes": 0.0}  # fmt: skip
    for inp in corpus:  # warm-up, untimed (lazy imports, kernel builds); every seed must load
        _write(inp, work)
        run_target(target, work)
    start = time.monotonic()
    try:
        while time.monotonic() - start < seconds:
            # the seeds first, as they are: they must load
            i = summary["runs"]
            inp = corpus[i] if i < len(corpus) else mutate(rng.choice(corpus), corpus, rng)
            finding = _run_one(target, inp, work, summary)
            summary["runs"] += 1
            if finding is not None:
                summary["findings"] += 1
                _save(out, target, summary["findings"], inp, finding)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    summary["seconds"] = round(time.monotonic() - start, 1)
    return summary


def _run_one(target: str, inp: Input, work: Path, summary: dict) -> str | None:
    _write(inp, work)
    size = sum(map(len, inp.values()))
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # peak memory (VmHWM) back to the current size
    before = _status("VmRSS:")
    elapsed, raised = _timed(target, work)
    problem = None
    if isinstance(raised, TinyformersError):
        kind = type(raised).__name__
        summary["errors"][kind] = summary["errors"].get(kind, 0) + 1
    elif raised is not None:  # anything else is what we look for
        problem = "".join(traceback.format_exception(raised))
    megabytes = (_status("VmHWM:") - before - size) / 2**20
    summary["max_seconds"] = round(max(summary["max_seconds"], elapsed), 3)
    summary["max_megabytes"] = round(max(summary["max_megabytes"], megabytes), 1)
    if problem is None and elapsed > SECONDS:
        # subtle: timed again before it counts: on a loaded machine one stall of the process
        # made a template refused in under 1 ms take 1.04 s; a slow input is slow twice
        elapsed = min(elapsed, _timed(target, work)[0])
    if problem is None and elapsed > SECONDS:
        problem = f"took {elapsed:.2f} s"
    if problem is None and megabytes > MEGABYTES:
        problem = f"peak memory {megabytes:.0f} MB over the input"
    return problem


def _timed(target: str, work: Path) -> tuple[float, BaseException | None]:
    """Wall seconds of one run of `target` on the files in `work` (under a 10 s alarm), and
    what it raised, if anything but Ctrl-C."""
    signal.alarm(10)
    t0 = time.perf_counter()
    raised = None
    try:
        run_target(target, work)
    except KeyboardInterrupt:
        raise
    except BaseException as e:  # noqa: BLE001 (the caller judges what was raised)
        raised = e
    finally:
        signal.alarm(0)
    return time.perf_counter() - t0, raised


def _write(inp: Input, work: Path) -> None:
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir()
    for name, data in inp.items():
        (work / name).write_bytes(data)


def _save(out: Path, target: str, n: int, inp: Input, finding: str) -> None:
    folder = out / target / f"finding-{n:03d}"
    folder.mkdir(parents=True, exist_ok=True)
    for name, data in inp.items():
        (folder / name).write_bytes(data)
    (folder / "finding.txt").write_text(finding)
    print(f"{target}: finding {n}: {finding.strip().splitlines()[-1]}", file=sys.stderr)


TARGETS = ["gguf", "safetensors", "pickle", "tokenizer_json", "vocab_merges", "config",
           "chat_template", "template_filters", "pre_tokenizer", "load"]  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", choices=TARGETS, action="append")
    parser.add_argument("--seconds", type=float, default=20.0, help="per target")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("fuzz-findings"))
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    warnings.simplefilter("ignore")  # torch's notes on odd pickles, once per input
    torch.set_num_threads(1)
    for target in args.target or TARGETS:
        print(json.dumps(fuzz(target, args.seconds, args.out, args.seed)), flush=True)


if __name__ == "__main__":
    main()
