"""Hugging Face `tokenizer.json` and side files, against HF tokenizers and transformers."""

from __future__ import annotations

import json
import shutil

import pytest
from corpus import GPT2_DIR, build_corpus, utf8_safe
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers

from tinyformers.errors import TokenizerError
from tinyformers.tokenizers import load_tokenizer
from tinyformers.tokenizers.sources import LLAMA3_PATTERN

SAMPLE = 300  # corpus documents per comparison (about 600 kB)


def gpt2_hf(pre_tokenizer=None) -> Tokenizer:
    hf = Tokenizer(models.BPE.from_file(str(GPT2_DIR / "vocab.json"), str(GPT2_DIR / "merges.txt")))
    hf.pre_tokenizer = pre_tokenizer or pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    return hf


def saved(hf: Tokenizer, folder) -> object:
    hf.save(str(folder / "tokenizer.json"))
    return load_tokenizer(folder / "tokenizer.json")


def assert_same_ids(tok, hf: Tokenizer, texts, allowed_special=frozenset()):
    expected = [e.ids for e in hf.encode_batch(texts)]
    for i, (text, ids) in enumerate(zip(texts, expected, strict=True)):
        assert tok.encode(text, allowed_special=allowed_special) == ids, f"text {i}: {text[:60]!r}"


def test_gpt2_tokenizer_json_with_special_token(tmp_path):
    hf = gpt2_hf()
    hf.add_special_tokens([AddedToken("<|endoftext|>", special=True, normalized=False)])
    tok = saved(hf, tmp_path)
    assert tok.special_tokens == {"<|endoftext|>": 50256} and tok.eos_token_id == 50256
    texts = [utf8_safe(d) for d in build_corpus()[:SAMPLE]]
    assert_same_ids(tok, hf, texts, allowed_special="all")  # HF always parses special text
    assert_same_ids(tok, gpt2_hf(), texts)  # ours by default: plain text, like no added token


def test_merges_as_strings_load_like_pairs(tmp_path):
    # Older tokenizer.json files write merges as "Ġ t", newer ones as ["Ġ", "t"].
    data = json.loads(gpt2_hf().to_str())
    data["model"]["merges"] = [" ".join(pair) for pair in data["model"]["merges"]]
    (tmp_path / "tokenizer.json").write_text(json.dumps(data), encoding="utf-8")
    assert (
        load_tokenizer(tmp_path).encode("hello world 2024")
        == gpt2_hf().encode("hello world 2024").ids
    )


def test_added_tokens_always_match_specials_only_when_allowed(tmp_path):
    hf = gpt2_hf()
    hf.add_tokens([AddedToken("hello world", normalized=False), " xyzzy"])
    hf.add_special_tokens([AddedToken("<|sep|>", special=True, normalized=False)])
    tok = saved(hf, tmp_path)
    assert tok.vocab_size == hf.get_vocab_size(with_added_tokens=True) == 50260
    texts = ["say hello world xyzzy <|sep|>", "hello worlds xyzzy xyzzy<|sep|><|sep|>", " xyzzy"]
    assert_same_ids(tok, hf, texts, allowed_special="all")
    plain = tok.encode("hello world<|sep|>")
    assert plain[0] == hf.token_to_id("hello world") and hf.token_to_id("<|sep|>") not in plain
    assert tok.decode(plain) == "hello world<|sep|>"


def test_llama3_split_pattern_matches_hf(tmp_path):
    # Llama 3's tokenizer.json shape: Split(pattern, isolated) then ByteLevel without its regex.
    pre = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(LLAMA3_PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok = saved(gpt2_hf(pre), tmp_path)
    assert_same_ids(tok, gpt2_hf(pre), [utf8_safe(d) for d in build_corpus()[:SAMPLE]])


def test_split_keeps_unmatched_gaps_like_hf(tmp_path):
    # A Split pattern that does not cover the text: the gaps between matches are pieces too.
    pre = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(r"\d+|(?:ab)+"), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok = saved(gpt2_hf(pre), tmp_path)
    assert_same_ids(tok, gpt2_hf(pre), ["xx123abababyy 4 ab", "ab", "", "no digits here"])


def tiny_bpe(ignore_merges: bool, unk_token: str | None = None) -> Tokenizer:
    # 'abc' is a token, but the merges reach [a, bc] first: ignore_merges decides (Llama 3 sets it).
    vocab = {"a": 0, "b": 1, "c": 2, "Ġ": 3, "bc": 4, "ab": 5, "abc": 6, "<unk>": 7, "Ġa": 8}
    merges = [("b", "c"), ("a", "b"), ("Ġ", "a")]
    hf = Tokenizer(models.BPE(vocab, merges, ignore_merges=ignore_merges, unk_token=unk_token))
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    return hf


@pytest.mark.parametrize("ignore_merges", [False, True])
def test_ignore_merges_matches_hf(tmp_path, ignore_merges):
    hf = tiny_bpe(ignore_merges)
    tok = saved(hf, tmp_path)
    assert_same_ids(tok, hf, ["abc", "abc abc", "cab", "ab", "bcabc"])
    assert (tok.encode("abc") == [6]) is ignore_merges


@pytest.mark.parametrize("unk_token", [None, "<unk>"])
def test_bytes_without_a_token_match_hf(tmp_path, unk_token):
    # 'd' and '!' have no token: dropped without an unk token, the unk token with one.
    hf = tiny_bpe(False, unk_token)
    tok = saved(hf, tmp_path)
    assert_same_ids(tok, hf, ["abd", "d", "a!!c dd"])


def test_side_files_match_transformers(tmp_path):
    import transformers

    for name in ("vocab.json", "merges.txt"):
        shutil.copy(GPT2_DIR / name, tmp_path / name)
    template = "{% for m in messages %}{{ m['content'] }}\n{% endfor %}"
    config = {"tokenizer_class": "GPT2Tokenizer", "bos_token": "<|endoftext|>", "pad_token": "!"}
    config["eos_token"] = {"content": "<|endoftext|>", "__type": "AddedToken"}
    config["chat_template"] = template
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    generation = {"bos_token_id": 50256, "eos_token_id": [50256, 198]}
    (tmp_path / "generation_config.json").write_text(json.dumps(generation), encoding="utf-8")

    tok = load_tokenizer(tmp_path)
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path)
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (
        hf.bos_token_id,
        hf.eos_token_id,
        hf.pad_token_id,
    )
    assert tok.chat_template == hf.chat_template
    assert tok.eos_token_ids == transformers.GenerationConfig.from_pretrained(tmp_path).eos_token_id


# -- unsupported or broken files: one clear error naming the file ----------------------------


def write_json(folder, data) -> None:
    (folder / "tokenizer.json").write_text(json.dumps(data), encoding="utf-8")


def test_unsupported_model_type(tmp_path):
    Tokenizer(models.WordPiece({"[UNK]": 0, "a": 1}, unk_token="[UNK]")).save(
        str(tmp_path / "tokenizer.json")
    )
    with pytest.raises(TokenizerError, match=r"tokenizer\.json: model type 'WordPiece' is not"):
        load_tokenizer(tmp_path)


def test_tokenizer_json_that_is_not_json(tmp_path):
    (tmp_path / "tokenizer.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(TokenizerError, match=r"tokenizer\.json: not a readable JSON file"):
        load_tokenizer(tmp_path)


def test_tokenizer_json_merge_naming_an_unknown_token(tmp_path):
    data = json.loads(tiny_bpe(False).to_str())
    data["model"]["merges"].append(["a", "zz"])
    write_json(tmp_path, data)
    with pytest.raises(TokenizerError, match=r"tokenizer\.json: merge 3 'a zz' names 'zz'"):
        load_tokenizer(tmp_path)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"normalizer": {"type": "NFC"}}, "a normalizer is not supported"),
        ({"pre_tokenizer": {"type": "Metaspace"}}, "pre_tokenizer step .* is not supported"),
        ({"pre_tokenizer": {"type": "Digits"}}, "pre_tokenizer has no ByteLevel step"),
        ({"decoder": {"type": "Metaspace"}}, "decoder .* is not ByteLevel"),
    ],
)
def test_tokenizer_json_that_is_not_byte_level(tmp_path, change, message):
    write_json(tmp_path, {**json.loads(tiny_bpe(False).to_str()), **change})
    with pytest.raises(TokenizerError, match=rf"tokenizer\.json: {message}"):
        load_tokenizer(tmp_path)


@pytest.mark.parametrize(
    "data",
    [
        [1, 2],
        {"model": None},
        {"model": {"type": "BPE"}, "decoder": {"type": "ByteLevel"}, "added_tokens": [{"id": 1}]},
    ],
)
def test_tokenizer_json_with_the_wrong_structure(tmp_path, data):
    write_json(tmp_path, data)
    with pytest.raises(TokenizerError, match=r"tokenizer\.json: not the structure of a tokenizer"):
        load_tokenizer(tmp_path)
