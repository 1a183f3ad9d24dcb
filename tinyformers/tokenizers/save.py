"""Write a tokenizer as Hugging Face files: `tokenizer.json` and `tokenizer_config.json`.

What `transformers.AutoTokenizer.from_pretrained(folder)` and our `load_tokenizer(folder)` both
read back with the ids of the tokenizer written, whatever it was loaded from:
- `Tokenizer` (byte-level BPE): model BPE over the byte alphabet, the split patterns as `Split`
  steps before `ByteLevel` (GPT-2's own pattern as `ByteLevel`'s regex), decoder `ByteLevel`;
- `SentencePieceTokenizer`: BPE with `byte_fallback`, ' ' -> ▁ (and `Prepend` ▁ for
  `add_space_prefix`) as the normalizer, decoder ▁ -> ' ', bytes, fuse (and strip the prefix);
  a GGUF's scores become merges: the pairs transformers' conversion lists, ranked by score;
- `CharTokenizer`: BPE whose vocabulary is the characters, no merges, no normalizer or
  pre-tokenizer, decoder `Fuse`: HF drops an unknown character, as `CharTokenizer` does.

Stop ids: tokenizer_config.json holds one `eos_token`. A tokenizer with several
(`eos_token_ids`) gets the rest back from generation_config.json's `eos_token_id` list, which
the model export writes and `load_tokenizer` and HF's generation both read.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tinyformers.loading.atomic import write_atomic
from tinyformers.tokenizers.bpe import GPT2_PATTERN, Tokenizer
from tinyformers.tokenizers.chars import CharTokenizer
from tinyformers.tokenizers.sentencepiece import SPACE, SentencePieceTokenizer


def save_tokenizer(
    tokenizer: Tokenizer | SentencePieceTokenizer | CharTokenizer, folder: Path
) -> None:
    """Write `tokenizer.json` and `tokenizer_config.json` into `folder` (made if missing).

    Example:
        save_tokenizer(CharTokenizer.from_text(text), Path("out"))
        load_tokenizer("out").encode("hi") == AutoTokenizer.from_pretrained("out").encode("hi")
    """
    if isinstance(tokenizer, CharTokenizer):
        data, names = _char_json(tokenizer), tokenizer.chars
    elif isinstance(tokenizer, Tokenizer):
        data = _byte_level_json(tokenizer)
        names = [""] * tokenizer.vocab_size
        for token, i in tokenizer.vocab.items():
            names[i] = token
    elif isinstance(tokenizer, SentencePieceTokenizer):
        data, names = _sentencepiece_json(tokenizer), tokenizer.tokens
    else:
        raise TypeError(f"cannot save a {type(tokenizer).__name__}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    write_atomic(folder / "tokenizer.json", json.dumps(data, ensure_ascii=False, indent=2))
    write_atomic(
        folder / "tokenizer_config.json",
        json.dumps(_config(tokenizer, names), ensure_ascii=False, indent=2) + "\n",
    )


def _config(tokenizer, names: list[str]) -> dict[str, Any]:
    """bos/eos/pad by name (how both HF and our loader find them), add_bos_token, the template.

    subtle: `tokenizer_class` PreTrainedTokenizerFast makes transformers run tokenizer.json as
    written; a model-specific class (GemmaTokenizer) would rebuild its own pipeline instead.
    `clean_up_tokenization_spaces` off, or transformers 4 decodes " ," as "," (5 ignores it
    for BPE)."""
    config: dict[str, Any] = {"tokenizer_class": "PreTrainedTokenizerFast"}
    for role in ("bos", "eos", "pad", "unk"):
        i = getattr(tokenizer, f"{role}_token_id", None)
        config[f"{role}_token"] = None if i is None else names[i]
    config["add_bos_token"] = tokenizer.add_bos_token
    config["add_eos_token"] = False
    config["clean_up_tokenization_spaces"] = False
    if tokenizer.chat_template is not None:
        config["chat_template"] = tokenizer.chat_template
    return config


def _bpe_model(vocab: dict[str, int], merges: list[tuple[str, str]], **options) -> dict:
    """HF's BPE model entry; a pair listed twice is kept at its first rank (as our loaders and
    llama.cpp read it; HF would keep the last)."""
    unique = list(dict.fromkeys(merges))
    return {
        "type": "BPE",
        "dropout": None,
        "unk_token": None,
        "continuing_subword_prefix": None,
        "end_of_word_suffix": None,
        "fuse_unk": False,
        "byte_fallback": False,
        "ignore_merges": False,
        **options,
        "vocab": vocab,
        "merges": [list(pair) for pair in unique],
    }


def _tokenizer_json(model: dict, added: list[dict], **pipeline) -> dict:
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added,
        "normalizer": None,
        "pre_tokenizer": None,
        "post_processor": None,
        "decoder": None,
        **pipeline,
        "model": model,
    }


def _added_tokens(special: dict[str, int], added: dict[str, int]) -> list[dict]:
    """Special tokens (matched only when allowed, by us; always, by HF) and added tokens
    (always matched), on the raw text (`normalized` off), in id order."""
    tokens = [(i, t, True) for t, i in special.items()] + [(i, t, False) for t, i in added.items()]
    return [
        {
            "id": i,
            "content": text,
            "single_word": False,
            "lstrip": False,
            "rstrip": False,
            "normalized": False,
            "special": is_special,
        }
        for i, text, is_special in sorted(tokens)
    ]


def _bos_template(tokenizer: Tokenizer | SentencePieceTokenizer, bos: str | None) -> dict | None:
    """HF's post-processor that puts BOS first, where the tokenizer asks for it: transformers'
    fast tokenizers add BOS from here, not from tokenizer_config's add_bos_token."""
    if not tokenizer.add_bos_token or bos is None:
        return None
    i = tokenizer.bos_token_id
    return {
        "type": "TemplateProcessing",
        "single": [
            {"SpecialToken": {"id": bos, "type_id": 0}},
            {"Sequence": {"id": "A", "type_id": 0}},
        ],
        "pair": [
            {"SpecialToken": {"id": bos, "type_id": 0}},
            {"Sequence": {"id": "A", "type_id": 0}},
            {"SpecialToken": {"id": bos, "type_id": 1}},
            {"Sequence": {"id": "B", "type_id": 1}},
        ],
        "special_tokens": {bos: {"id": bos, "ids": [i], "tokens": [bos]}},
    }


def _char_json(tokenizer: CharTokenizer) -> dict:
    vocab = {c: i for i, c in enumerate(tokenizer.chars)}
    return _tokenizer_json(_bpe_model(vocab, []), [], decoder={"type": "Fuse"})


def _byte_level_json(tokenizer: Tokenizer) -> dict:
    """Each split pattern as an isolated `Split`, in order, then `ByteLevel`, which runs GPT-2's
    pattern itself when that is the last one (GPT-2, SmolLM) and only maps bytes otherwise."""
    patterns = tokenizer.split_patterns
    use_regex = bool(patterns) and patterns[-1] == GPT2_PATTERN
    steps: list[dict] = [
        {"type": "Split", "pattern": {"Regex": p}, "behavior": "Isolated", "invert": False}
        for p in (patterns[:-1] if use_regex else patterns)
    ]
    byte_level = {"add_prefix_space": False, "trim_offsets": True, "use_regex": use_regex}
    steps.append({"type": "ByteLevel", **byte_level})
    vocab = tokenizer.vocab
    unk = tokenizer.unk_token_id
    model = _bpe_model(
        vocab,
        tokenizer.merges,
        unk_token=None if unk is None else next(t for t, i in vocab.items() if i == unk),
        ignore_merges=tokenizer.ignore_merges,
    )
    return _tokenizer_json(
        model,
        _added_tokens(tokenizer.special_tokens, tokenizer.added_tokens),
        pre_tokenizer=steps[0] if len(steps) == 1 else {"type": "Sequence", "pretokenizers": steps},
        post_processor=_bos_template(tokenizer, tokenizer.bos_token),
        decoder={
            "type": "ByteLevel",
            "add_prefix_space": False,
            "trim_offsets": True,
            "use_regex": True,
        },
    )


def _sentencepiece_json(tokenizer: SentencePieceTokenizer) -> dict:
    """HF's layout of a SentencePiece BPE (Llama 2, Gemma), which transformers also writes."""
    tokens = tokenizer.tokens
    merges = tokenizer.merges
    if merges is None:
        merges = _merges_from_scores(tokens, tokenizer.scores)
    model = _bpe_model(
        {t: i for i, t in enumerate(tokens)},
        merges,
        unk_token=tokenizer.unk_token,
        byte_fallback=True,
    )
    replace = {"type": "Replace", "pattern": {"String": " "}, "content": SPACE}
    decode = [
        {"type": "Replace", "pattern": {"String": SPACE}, "content": " "},
        {"type": "ByteFallback"},
        {"type": "Fuse"},
    ]
    if tokenizer.add_space_prefix:
        normalizer = {
            "type": "Sequence",
            "normalizers": [{"type": "Prepend", "prepend": SPACE}, replace],
        }
        decode.append({"type": "Strip", "content": " ", "start": 1, "stop": 0})
    else:
        normalizer = replace
    return _tokenizer_json(
        model,
        _added_tokens(tokenizer.special_tokens, tokenizer.added_tokens),
        normalizer=normalizer,
        post_processor=_bos_template(tokenizer, tokenizer.bos_token),
        decoder={"type": "Sequence", "decoders": decode},
    )


def _merges_from_scores(tokens: list[str], scores: list[float]) -> list[tuple[str, str]]:
    """Every way to build a token from two tokens, ranked by the token's score, best first.

    With scores (llama.cpp), a + b merges when a + b is a token, the best score first; a merge
    list says the same when it holds every such pair, in score order.
    subtle: equal scores (Gemma's control and user-defined tokens, all -1000) go by token id,
    then by the left part's length; llama.cpp would take the leftmost pair instead, which
    differs only where two such tokens could form at once in one fragment.
    """
    ids = {t: i for i, t in enumerate(tokens)}
    ranked = [
        (-score, i, k)
        for i, (token, score) in enumerate(zip(tokens, scores, strict=True))
        for k in range(1, len(token))
        if token[:k] in ids and token[k:] in ids
    ]
    ranked.sort()
    return [(tokens[i][:k], tokens[i][k:]) for _, i, k in ranked]
