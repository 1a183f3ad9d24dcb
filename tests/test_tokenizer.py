"""The BPE core on GPT-2's vocab.json + merges.txt, against tiktoken and HF tokenizers."""

from __future__ import annotations

import json
import random

import pytest
from corpus import GPT2_DIR, PEER_DIR, build_corpus, hf_gpt2, tiktoken_gpt2
from hypothesis import given, settings
from hypothesis import strategies as st

from tinyformers.errors import TokenizerError
from tinyformers.tokenizers import load_tokenizer


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(GPT2_DIR)


def test_gpt2_files_give_gpt2_specials(tok):
    # tiktoken's gpt2 encoding: n_vocab 50257, special_tokens {"<|endoftext|>": 50256}.
    enc = tiktoken_gpt2()
    assert tok.vocab_size == enc.n_vocab
    assert tok.special_tokens == enc._special_tokens
    assert (tok.eos_token_id, tok.bos_token_id, tok.pad_token_id) == (50256, 50256, None)
    assert tok.eos_token_ids == [50256] and tok.eos_token == tok.bos_token == "<|endoftext|>"


def test_tiktoken_literal_cases(tok):
    cases = json.loads((PEER_DIR / "tiktoken_gpt2_cases.json").read_text(encoding="utf-8"))
    assert len(cases) == 28
    for case in cases:
        allowed = "all" if case["mode"] == "allowed_special_all" else frozenset()
        assert tok.encode(case["text"], allowed_special=allowed) == case["ids"], case["note"]
        assert tok.decode(case["ids"]) == case["text"], case["note"]


def test_special_token_text_is_plain_text_unless_allowed(tok):
    enc = tiktoken_gpt2()
    text = "user says <|endoftext|> then <|endoftext|><|endoftext|>!"
    plain = tok.encode(text)
    assert 50256 not in plain
    assert plain == enc.encode_ordinary(text)
    for allowed in ("all", {"<|endoftext|>"}):
        assert tok.encode(text, allowed_special=allowed) == enc.encode(text, allowed_special="all")
    assert tok.decode(plain) == text
    with pytest.raises(ValueError, match="<|im_start|>"):
        tok.encode(text, allowed_special={"<|im_start|>"})


def test_encode_batch_is_encode_of_each(tok):
    texts = list(build_corpus()[:50])
    assert tok.encode_batch(texts) == [tok.encode(t) for t in texts]
    assert tok.encode_batch(texts) == tiktoken_gpt2().encode_ordinary_batch(texts, num_threads=1)


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=200))
def test_decode_encode_roundtrip_matches_tiktoken(tok, text):
    # st.text() draws any code point except surrogates; see the surrogate test below for those.
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert ids == tiktoken_gpt2().encode_ordinary(text)


def test_lone_surrogates_are_replaced_like_tiktoken(tok):
    enc = tiktoken_gpt2()
    for text in ["\ud800", "a\udfffb", "x \ud83d\ude00 y", "\ud83d", "\ude00\ud83d", "é\udc80" * 3]:
        ids = tok.encode(text)
        assert ids == enc.encode_ordinary(text), repr(text)
        # a lone surrogate decodes as U+FFFD; a surrogate pair as its character
        assert tok.decode(ids) == enc.decode(ids)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.integers(0, 50256), max_size=40))
def test_decode_invalid_utf8_replaced_like_tiktoken(tok, ids):
    assert tok.decode(ids) == tiktoken_gpt2().decode(ids, errors="replace")


@settings(max_examples=300, deadline=None)
@given(st.lists(st.integers(0, 50256), max_size=40))
def test_stream_decoder_concatenates_to_decode(tok, ids):
    decoder = tok.decoder()
    assert "".join(decoder.feed(i) for i in ids) + decoder.flush() == tok.decode(ids)


def test_stream_decoder_never_emits_half_a_character(tok):
    text = "é👨‍👩‍👧‍👦 生活的真谛是 नमस्ते 🇫🇷🤷🏼‍♀️ ok"
    ids = tok.encode(text)
    assert any("\ufffd" in tok.decode([i]) for i in ids)  # tokens alone split characters
    decoder = tok.decoder()
    pieces = [decoder.feed(i) for i in ids] + [decoder.flush()]
    assert "".join(pieces) == text
    assert not any("\ufffd" in p for p in pieces)


def test_decode_rejects_ids_outside_the_vocabulary(tok):
    for bad in (50257, -1):
        with pytest.raises(TokenizerError, match=f"token id {bad} is outside 0..50256"):
            tok.decode([31373, bad])


@pytest.mark.slow
def test_million_characters_without_spaces_match_hf(tok):
    # One 1,000,000-character piece: a quadratic merge loop would take hours; HF's BPE is a
    # heap over a linked list like ours, so it is the reference here.
    rng = random.Random(0)
    text = "".join(rng.choices("abcdefghijklmnopqrstuvwxyz", k=1_000_000))
    assert tok.encode(text) == hf_gpt2().encode(text).ids
    # one \p{N}+ piece where every pair is the same merge; whitespace runs that end in the
    # \s+(?!\S) lookahead (tiktoken 0.14's regex overflows its stack on the spaces)
    for run in ["7" * 200_000, " " * 1_000_000 + "a", "\n" * 200_000]:
        assert tok.encode(run) == hf_gpt2().encode(run).ids


# -- sources and their errors ----------------------------------------------------------------


def copy_gpt2(folder, **replace):
    for name in ("vocab.json", "merges.txt"):
        text = replace.get(name) or (GPT2_DIR / name).read_text(encoding="utf-8")
        (folder / name).write_text(text, encoding="utf-8")
    return folder


def test_vocab_json_that_is_not_json(tmp_path):
    copy_gpt2(tmp_path, **{"vocab.json": '{"!": 0, '})
    with pytest.raises(TokenizerError, match=r"vocab\.json: not a readable JSON file"):
        load_tokenizer(tmp_path)


def test_vocab_json_that_is_not_a_token_table(tmp_path):
    copy_gpt2(tmp_path, **{"vocab.json": '["!", "a"]'})
    with pytest.raises(TokenizerError, match=r"vocab\.json: expected a JSON object"):
        load_tokenizer(tmp_path)


def test_merge_naming_an_unknown_token(tmp_path):
    merges = (GPT2_DIR / "merges.txt").read_text(encoding="utf-8") + "Ġ zzzzunknown\n"
    copy_gpt2(tmp_path, **{"merges.txt": merges})
    with pytest.raises(TokenizerError, match=r"merges\.txt: merge 50000 'Ġ zzzzunknown' names"):
        load_tokenizer(tmp_path)


def test_merge_line_that_is_not_a_pair(tmp_path):
    copy_gpt2(tmp_path, **{"merges.txt": "#version: 0.2\nĠ t\nĠta\n"})
    with pytest.raises(TokenizerError, match=r"merges\.txt: line 3: expected two tokens"):
        load_tokenizer(tmp_path)


def test_folder_without_tokenizer(tmp_path):
    with pytest.raises(TokenizerError, match="no tokenizer here"):
        load_tokenizer(tmp_path)
