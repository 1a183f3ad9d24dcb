"""Build a tokenizer from what ships with a model: GGUF metadata, `tokenizer.json`, or
`vocab.json` + `merges.txt` (with Hugging Face's side files for bos/eos and the chat template).
Byte-level BPE gives a `Tokenizer`; SentencePiece-style BPE (GGUF model `llama`, or a BPE
tokenizer.json with `byte_fallback`) a `SentencePieceTokenizer`; a tokenizer.json that only maps
characters (decoder `Fuse`, what `save_tokenizer` writes for one) a `CharTokenizer`.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import regex

from tinyformers.errors import TokenizerError
from tinyformers.loading.json_file import read_json, read_text
from tinyformers.tokenizers.bpe import GPT2_PATTERN, LLAMA3_PATTERN, Tokenizer
from tinyformers.tokenizers.chars import CharTokenizer
from tinyformers.tokenizers.sentencepiece import SPACE, SentencePieceTokenizer

# llama.cpp's `tokenizer.ggml.pre` names -> split patterns, applied in order (llama-vocab.cpp).
GGUF_PRE_PATTERNS = {
    "gpt-2": [GPT2_PATTERN],
    "smollm": [r"\p{N}", GPT2_PATTERN],  # every digit alone first, like HF's Digits(individual)
    "llama-bpe": [LLAMA3_PATTERN],  # Llama 3
}
_IGNORE_MERGES_PRE = {"llama-bpe"}  # llama.cpp sets ignore_merges for Llama 3's vocabulary

# GGUF token types (llama.cpp's llama_token_type).
_UNKNOWN, _CONTROL, _USER_DEFINED = 2, 3, 4

# A vocabulary with this token and no file naming bos/eos follows GPT-2: it is both.
_GPT2_EOS = "<|endoftext|>"


def load_tokenizer(
    name_or_path: str | os.PathLike,
) -> Tokenizer | SentencePieceTokenizer | CharTokenizer:
    """The tokenizer of a `.gguf` file, a model folder, a `tokenizer.json`, or a model name.

    Example: load_tokenizer("tests/data/gpt2").encode("hello world") == [31373, 995]
    """
    from tinyformers.loading.hub import resolve

    path = resolve(name_or_path)
    if path.is_file() and path.suffix == ".gguf":
        from tinyformers.loading.gguf import read_gguf

        with read_gguf(path) as gguf:
            return from_gguf_metadata(gguf.metadata, str(path))
    folder = path.parent if path.is_file() and path.name == "tokenizer.json" else path
    if (folder / "tokenizer.json").exists():
        return from_tokenizer_json(folder / "tokenizer.json")
    if (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file():
        return from_vocab_merges(folder / "vocab.json", folder / "merges.txt")
    raise TokenizerError(
        f"{path}: no tokenizer here (expected a .gguf file, or a folder with tokenizer.json "
        "or vocab.json + merges.txt)"
    )


# -- GGUF ----------------------------------------------------------------------------------


def from_gguf_metadata(metadata: dict[str, Any], source: str) -> Tokenizer | SentencePieceTokenizer:
    """The tokenizer described by a GGUF file's `tokenizer.ggml.*` keys (model `gpt2`: byte-level
    BPE; `llama`: SentencePiece-style BPE)."""
    with _structure_errors(source, "GGUF tokenizer metadata"):
        if metadata.get("tokenizer.ggml.model") == "llama":
            return _from_gguf_sentencepiece(metadata, source)
        return _from_gguf_metadata(metadata, source)


def _from_gguf_metadata(metadata: dict[str, Any], source: str) -> Tokenizer:
    model = metadata.get("tokenizer.ggml.model")
    if not isinstance(model, str) or model != "gpt2":
        raise TokenizerError(
            f"{source}: tokenizer.ggml.model {model!r:.40} is not supported "
            "(expected 'gpt2' or 'llama')"
        )
    pre = metadata.get("tokenizer.ggml.pre")
    if not isinstance(pre, str) or pre not in GGUF_PRE_PATTERNS:
        raise TokenizerError(
            f"{source}: tokenizer.ggml.pre {pre!r} is not supported "
            f"(known: {', '.join(sorted(GGUF_PRE_PATTERNS))})"
        )
    tokens = _gguf_list(metadata, "tokenizer.ggml.tokens", source)
    merges = _gguf_list(metadata, "tokenizer.ggml.merges", source)
    types = _gguf_token_types(metadata, tokens, source)
    vocab = {token: i for i, token in enumerate(tokens)}
    if len(vocab) != len(tokens):
        raise TokenizerError(f"{source}: tokenizer.ggml.tokens lists a token twice")
    return Tokenizer(
        vocab,
        [_merge_pair(m, source, f"tokenizer.ggml.merges[{i}]") for i, m in enumerate(merges)],
        GGUF_PRE_PATTERNS[pre],
        special_tokens=[t for t, kind in zip(tokens, types, strict=True) if kind == _CONTROL],
        added_tokens=[t for t, kind in zip(tokens, types, strict=True) if kind == _USER_DEFINED],
        bos_token_id=metadata.get("tokenizer.ggml.bos_token_id"),
        eos_token_id=metadata.get("tokenizer.ggml.eos_token_id"),
        pad_token_id=metadata.get("tokenizer.ggml.padding_token_id"),
        ignore_merges=pre in _IGNORE_MERGES_PRE,
        add_bos_token=metadata.get("tokenizer.ggml.add_bos_token", False),
        chat_template=metadata.get("tokenizer.chat_template"),
        source=source,
    )


def _from_gguf_sentencepiece(metadata: dict[str, Any], source: str) -> SentencePieceTokenizer:
    """llama.cpp's SPM vocabulary: tokens with scores; when a key is absent, its defaults
    (bos 1, eos 2, unk 0, add_bos_token and add_space_prefix on)."""
    tokens = _gguf_list(metadata, "tokenizer.ggml.tokens", source)
    scores = metadata.get("tokenizer.ggml.scores", [0.0] * len(tokens))
    types = _gguf_token_types(metadata, tokens, source)
    ids = {role: metadata.get(f"tokenizer.ggml.{role}_token_id", i)
           for role, i in (("bos", 1), ("eos", 2), ("unknown", 0), ("padding", None))}  # fmt: skip
    return SentencePieceTokenizer(
        tokens,
        scores=scores,
        # subtle: llama.cpp matches UNKNOWN-type tokens only where CONTROL ones are allowed
        special_tokens=[
            t for t, kind in zip(tokens, types, strict=True) if kind in (_UNKNOWN, _CONTROL)
        ],
        added_tokens=[t for t, kind in zip(tokens, types, strict=True) if kind == _USER_DEFINED],
        bos_token_id=ids["bos"],
        eos_token_id=ids["eos"],
        unk_token_id=ids["unknown"],
        pad_token_id=ids["padding"],
        add_bos_token=metadata.get("tokenizer.ggml.add_bos_token", True),
        add_space_prefix=metadata.get("tokenizer.ggml.add_space_prefix", True),
        chat_template=metadata.get("tokenizer.chat_template"),
        source=source,
    )


def _gguf_token_types(metadata: dict[str, Any], tokens: list[str], source: str) -> list[int]:
    types = metadata.get("tokenizer.ggml.token_type") or [1] * len(tokens)
    if not isinstance(types, list):
        raise TokenizerError(f"{source}: tokenizer.ggml.token_type is not a list")
    if len(types) != len(tokens):
        raise TokenizerError(
            f"{source}: tokenizer.ggml.token_type has {len(types)} entries for {len(tokens)} tokens"
        )
    if not all(map(_is_id, types)):
        bad = next(t for t in types if not _is_id(t))
        raise TokenizerError(
            f"{source}: tokenizer.ggml.token_type holds {bad!r:.40}, expected integers (1 normal, "
            "2 unknown, 3 control, 4 user-defined, 5 unused, 6 byte)"
        )
    return types


def _gguf_list(metadata: dict[str, Any], key: str, source: str) -> list[str]:
    value = metadata.get(key)
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise TokenizerError(f"{source}: {key} is missing or not a list of strings")
    return value


# -- Hugging Face files --------------------------------------------------------------------


def from_tokenizer_json(path: Path) -> Tokenizer | SentencePieceTokenizer | CharTokenizer:
    """A Hugging Face `tokenizer.json` with a BPE model (byte-level, SentencePiece-style with
    `byte_fallback`, or characters only), plus its folder's side files."""
    data = read_json(path, TokenizerError, require_object=False)  # structure checked below
    with _structure_errors(path, "tokenizer.json"):
        return _from_tokenizer_data(data, path)


@contextmanager
def _structure_errors(source: str | Path, kind: str) -> Iterator[None]:
    """A wrong type anywhere in a file's structure (a list where an object belongs, a number
    for a token) becomes one TokenizerError naming the file, not a traceback."""
    try:
        yield
    except (KeyError, TypeError, AttributeError, ValueError, IndexError) as e:
        raise TokenizerError(f"{source}: not the structure of a {kind} ({e!r:.200})") from e


def _from_tokenizer_data(
    data: dict[str, Any], path: Path
) -> Tokenizer | SentencePieceTokenizer | CharTokenizer:
    model = data["model"]
    if model.get("type") != "BPE":
        raise TokenizerError(
            f"{path}: model type {model.get('type')!r} is not supported (expected 'BPE')"
        )
    for key in ("continuing_subword_prefix", "end_of_word_suffix", "dropout"):
        if model.get(key):
            raise TokenizerError(f"{path}: BPE option {key}={model[key]!r} is not supported")
    if model.get("byte_fallback") is True:
        return _from_sentencepiece_data(data, path)
    if model.get("byte_fallback"):
        raise TokenizerError(f"{path}: BPE option byte_fallback={model['byte_fallback']!r:.40}")
    if (data.get("decoder") or {}).get("type") == "Fuse":
        return _from_char_data(data, path)
    if data.get("normalizer") is not None:
        raise TokenizerError(f"{path}: a normalizer is not supported (byte-level BPE has none)")
    if (data.get("decoder") or {}).get("type") != "ByteLevel":
        raise TokenizerError(f"{path}: decoder {data.get('decoder')!r} is not ByteLevel")
    vocab, special, added = _vocab_and_added(data, path)
    merges = [
        _merge_pair(m, str(path), f"merge {i}") for i, m in enumerate(model.get("merges") or [])
    ]
    return _with_side_files(
        path.parent,
        vocab,
        merges,
        _split_patterns(data.get("pre_tokenizer"), path),
        special,
        added,
        ignore_merges=bool(model.get("ignore_merges")),
        unk_token_id=_token_id(vocab, model.get("unk_token"), f"{path}: model.unk_token"),
        source=str(path),
    )


def _from_char_data(data: dict[str, Any], path: Path) -> CharTokenizer:
    """A BPE tokenizer.json that maps each character to its id and nothing else: no merges,
    normalizer, pre- or post-processor, added or unknown token; its decoder `Fuse` joins the
    characters. HF `tokenizers` encodes it as `CharTokenizer` does (unknown characters dropped)."""
    model = data["model"]
    parts = {
        "merges": model.get("merges"),
        "unk_token": model.get("unk_token"),
        "normalizer": data.get("normalizer"),
        "pre_tokenizer": data.get("pre_tokenizer"),
        "post_processor": data.get("post_processor"),
        "added_tokens": data.get("added_tokens"),
    }
    if present := [name for name, value in parts.items() if value]:
        raise TokenizerError(
            f"{path}: decoder Fuse is read as a character tokenizer, which has no "
            f"{', '.join(present)}"
        )
    chars = [""] * len(model["vocab"])
    for char, i in model["vocab"].items():
        if not (_is_id(i) and i < len(chars)) or chars[i]:
            raise TokenizerError(f"{path}: token {char!r:.40} has id {i!r:.40} (ids are dense)")
        chars[i] = char
    return CharTokenizer(chars, source=str(path))


def _vocab_and_added(data: dict[str, Any], path: Path) -> tuple[dict[str, int], list, list]:
    """The model's vocab plus `added_tokens`, and the added ones split into special / not."""
    vocab = dict(data["model"].get("vocab") or {})
    special, added = [], []
    for token in data.get("added_tokens") or []:
        text = token["content"]
        if any(token.get(flag) for flag in ("lstrip", "rstrip", "single_word")):
            raise TokenizerError(
                f"{path}: added token {text!r}: lstrip/rstrip/single_word unsupported"
            )
        if vocab.setdefault(text, token["id"]) != token["id"]:
            raise TokenizerError(
                f"{path}: added token {text!r} has id {token['id']}, vocab says {vocab[text]}"
            )
        (special if token.get("special") else added).append(text)
    return vocab, special, added


def _from_sentencepiece_data(data: dict[str, Any], path: Path) -> SentencePieceTokenizer:
    """A BPE tokenizer.json with `byte_fallback` (Llama 2, Gemma): ▁ for spaces, merge ranks."""
    vocab, special, added = _vocab_and_added(data, path)
    tokens = [""] * len(vocab)
    for token, i in vocab.items():
        if not (_is_id(i) and i < len(tokens)) or tokens[i]:
            raise TokenizerError(f"{path}: token {token!r:.40} has id {i!r:.40} (ids are dense)")
        tokens[i] = token
    model = data["model"]
    merges = [_merge_pair(m, str(path), f"merge {i}") for i, m in enumerate(model["merges"])]
    folder = path.parent
    config = _side_config(folder)
    ids = {
        role: _token_id(vocab, _token_text(config.get(f"{role}_token")), f"{folder}: {role}_token")
        for role in ("bos", "eos", "pad")
    }
    add_bos = config.get("add_bos_token")
    if add_bos is None:  # HF's Gemma conversion says it in the post-processor instead
        first = ((data.get("post_processor") or {}).get("single") or [{}])[0]
        add_bos = (
            ids["bos"] is not None and first.get("SpecialToken", {}).get("id") == tokens[ids["bos"]]
        )
    tokenizer = SentencePieceTokenizer(
        tokens,
        merges=merges,
        special_tokens=special,
        added_tokens=added,
        bos_token_id=ids["bos"],
        eos_token_id=ids["eos"],
        pad_token_id=ids["pad"],
        unk_token_id=_token_id(vocab, model.get("unk_token"), f"{path}: model.unk_token"),
        add_bos_token=add_bos,
        add_space_prefix=_space_prefix(data.get("normalizer"), data.get("pre_tokenizer"), path),
        chat_template=_chat_template(folder, config),
        source=str(path),
    )
    _add_generation_eos(tokenizer, _generation_config(folder), folder)
    return tokenizer


def _space_prefix(normalizer: dict | None, pre_tokenizer: dict | None, path: Path) -> bool:
    """Whether a ▁ goes before the text: HF writes ' ' -> ▁ and the prefix as a normalizer
    (Replace, Prepend) or as a Metaspace pre-tokenizer; anything else is refused."""
    steps = [] if normalizer is None else [normalizer]
    if normalizer is not None and normalizer.get("type") == "Sequence":
        steps = normalizer["normalizers"]
    replaces, prefix = False, False
    for step in steps:
        kind = step.get("type")
        if kind == "Replace" and step.get("pattern") == {"String": " "}:
            replaces = step.get("content") == SPACE
        elif kind == "Prepend" and step.get("prepend") == SPACE:
            prefix = True
        else:
            raise TokenizerError(f"{path}: normalizer step {step!r:.80} is not supported")
    pre = pre_tokenizer or {}
    if pre.get("type") == "Metaspace" and pre.get("replacement") == SPACE and not pre["split"]:
        if pre.get("prepend_scheme") not in ("always", "never"):
            raise TokenizerError(f"{path}: Metaspace prepend_scheme {pre['prepend_scheme']!r}")
        replaces, prefix = True, pre["prepend_scheme"] == "always"
    # HF's Gemma conversion splits on ' ' after the normalizer has replaced every ' ': a no-op
    elif pre and not (pre.get("type") == "Split" and pre.get("pattern") == {"String": " "}):
        raise TokenizerError(f"{path}: pre_tokenizer {pre!r:.80} is not supported")
    if not replaces:
        raise TokenizerError(f"{path}: byte_fallback BPE without ' ' -> ▁ is not supported")
    return prefix


def from_vocab_merges(vocab_path: Path, merges_path: Path) -> Tokenizer:
    """GPT-2's original pair of files (`encoder.json`/`vocab.bpe` under HF's names)."""
    vocab = read_json(vocab_path, TokenizerError)
    lines = read_text(merges_path, TokenizerError).splitlines()
    with _structure_errors(vocab_path.parent, "vocab.json folder's side files"):
        return _from_vocab_merges(vocab, lines, vocab_path, merges_path)


def _from_vocab_merges(
    vocab: dict, lines: list[str], vocab_path: Path, merges_path: Path
) -> Tokenizer:
    merges = [
        _merge_pair(line, str(merges_path), f"line {n}")
        for n, line in enumerate(lines, start=1)
        if line and not (n == 1 and line.startswith("#version"))
    ]
    config = _side_config(vocab_path.parent)
    special = {
        token["content"]
        for token in (config.get("added_tokens_decoder") or {}).values()
        if token.get("special")
    }
    special |= {_token_text(t) for t in config.get("additional_special_tokens") or []}
    for role in ("bos", "eos", "pad", "unk"):
        if name := _token_text(config.get(f"{role}_token")):
            special.add(name)
    if not special and _GPT2_EOS in vocab:
        special.add(_GPT2_EOS)
    return _with_side_files(
        vocab_path.parent,
        vocab,
        merges,
        [GPT2_PATTERN],
        sorted(special),
        [],
        source=str(vocab_path),
        merges_source=str(merges_path),
    )


def _with_side_files(
    folder: Path,
    vocab: dict[str, int],
    merges: list[tuple[str, str]],
    patterns: list[str],
    special: list[str],
    added: list[str],
    *,
    source: str,
    ignore_merges: bool = False,
    unk_token_id: int | None = None,
    merges_source: str | None = None,
) -> Tokenizer:
    """bos/eos/pad and the chat template from tokenizer_config.json, special_tokens_map.json and
    generation_config.json: a token named in the first two wins over an id in the last."""
    config = _side_config(folder)
    generation = _generation_config(folder)
    ids: dict[str, int | None] = {}
    for role in ("bos", "eos", "pad"):
        named = _token_id(
            vocab, _token_text(config.get(f"{role}_token")), f"{folder}: {role}_token"
        )
        fallback = generation.get(f"{role}_token_id")
        if isinstance(fallback, list):
            fallback = fallback[0] if fallback else None
        if fallback is None and role != "pad" and _GPT2_EOS in vocab:
            fallback = vocab[_GPT2_EOS]
        ids[role] = named if named is not None else fallback
    tokenizer = Tokenizer(
        vocab,
        merges,
        patterns,
        special_tokens=special,
        added_tokens=added,
        bos_token_id=ids["bos"],
        eos_token_id=ids["eos"],
        pad_token_id=ids["pad"],
        ignore_merges=ignore_merges,
        unk_token_id=unk_token_id,
        add_bos_token=config.get("add_bos_token", False),
        chat_template=_chat_template(folder, config),
        source=source,
        merges_source=merges_source,
    )
    _add_generation_eos(tokenizer, generation, folder)
    return tokenizer


def _generation_config(folder: Path) -> dict[str, Any]:
    path = folder / "generation_config.json"
    return read_json(path, TokenizerError) if path.exists() else {}


def _add_generation_eos(
    tokenizer: Tokenizer | SentencePieceTokenizer, generation: dict[str, Any], folder: Path
) -> None:
    """Append generation_config.json's eos ids (one or a list, e.g. Llama 3's three) to the
    tokenizer's stop ids: the one place HF files keep more than one."""
    extra = generation.get("eos_token_id")
    for i in extra if isinstance(extra, list) else [extra]:
        if i is not None and not (_is_id(i) and i < tokenizer.vocab_size):
            raise TokenizerError(
                f"{folder}: generation_config.json eos_token_id {i!r:.40} is not in the vocabulary"
            )
        if i is not None and i not in tokenizer.eos_token_ids:
            tokenizer.eos_token_ids.append(i)


def _side_config(folder: Path) -> dict[str, Any]:
    config: dict[str, Any] = {}
    for name in ("special_tokens_map.json", "tokenizer_config.json"):  # the later one wins
        if (folder / name).exists():
            config.update(read_json(folder / name, TokenizerError))
    return config


def _chat_template(folder: Path, config: dict[str, Any]) -> str | None:
    if (folder / "chat_template.jinja").exists():
        return read_text(folder / "chat_template.jinja", TokenizerError)
    template = config.get("chat_template")
    # Some configs hold several: [{"name": "default", "template": ...}, {"name": "tool_use", ...}]
    if isinstance(template, list):
        template = next((t["template"] for t in template if t.get("name") == "default"), None)
    return template


def _token_id(vocab: dict[str, int], token: str | None, where: str) -> int | None:
    if token is not None and token not in vocab:
        raise TokenizerError(f"{where} {token!r} is not in the vocabulary")
    return None if token is None else vocab[token]


def _is_id(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _token_text(value: Any) -> str | None:
    """A token as the side files write it: a string or an AddedToken dict with `content`."""
    return value.get("content") if isinstance(value, dict) else value


def _split_patterns(pre_tokenizer: dict | None, path: Path) -> list[str]:
    """Regex splits of a HF pre_tokenizer: ByteLevel, or a Sequence of Split, Digits, ByteLevel."""
    steps = (
        [pre_tokenizer]
        if (pre_tokenizer or {}).get("type") != "Sequence"
        else pre_tokenizer["pretokenizers"]
    )
    patterns, byte_level = [], False
    for step in steps:
        kind = (step or {}).get("type")
        if kind == "ByteLevel" and not step.get("add_prefix_space"):
            byte_level = True
            if step.get("use_regex", True):
                patterns.append(GPT2_PATTERN)
        elif kind == "Digits":
            # HF uses Rust's char::is_numeric: general categories Nd, Nl, No, which is \p{N}.
            patterns.append(r"\p{N}" if step.get("individual_digits") else r"\p{N}+")
        elif kind == "Split" and step.get("behavior") == "Isolated" and not step.get("invert"):
            pattern = step["pattern"]
            patterns.append(
                pattern["Regex"] if "Regex" in pattern else regex.escape(pattern["String"])
            )
        else:
            raise TokenizerError(f"{path}: pre_tokenizer step {step!r} is not supported")
    if not byte_level:
        raise TokenizerError(f"{path}: pre_tokenizer has no ByteLevel step (not a byte-level BPE)")
    return patterns


def _merge_pair(merge: str | list[str], source: str, where: str) -> tuple[str, str]:
    """'Ġ t' or ["Ġ", "t"] -> ("Ġ", "t")."""
    parts = merge.split(" ") if isinstance(merge, str) else merge
    if len(parts) != 2 or not all(isinstance(p, str) and p for p in parts):
        raise TokenizerError(f"{source}: {where}: expected two tokens, got {merge!r}")
    return parts[0], parts[1]
