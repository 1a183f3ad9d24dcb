"""`save_tokenizer` and `CharTokenizer`: every kind of tokenizer, written as Hugging Face files,
loads back with the original's ids in our `load_tokenizer`, HF `tokenizers` and transformers'
`AutoTokenizer`, and decodes to the same text."""

from __future__ import annotations

import json
import re

import pytest
import transformers
from conftest import gemma3_gguf, hf_gpt2
from corpus import GPT2_DIR, build_corpus, smollm2_gguf, utf8_safe
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers
from tokenizers import Tokenizer as HFTokenizer

from tinyformers.cli import main
from tinyformers.errors import TokenizerError
from tinyformers.tokenizers import (
    CharTokenizer,
    SentencePieceTokenizer,
    load_tokenizer,
    prompt_ids,
    save_tokenizer,
)
from tinyformers.tokenizers.bpe import GPT2_PATTERN, LLAMA3_PATTERN

# What breaks tokenizers, by hand, before a sample of the corpus (every 40th document, ~300 kB).
CASES = [
    "",
    "Hello world",
    "<|endoftext|>Hello<|im_start|>user\n<|im_end|><start_of_turn><eos>",
    "12345 3.14159 1,000,000 ½ ٣٤٥ ①②",
    "emoji 😀👨\u200d👩\u200d👧\u200d👦 🇫🇷 👍🏻",
    "中文字符 日本語のテキスト 한국어",
    "   leading, trailing and  inner  runs   ",
    "tabs\tand\t\ttabs \n\nnew\nlines\r\n\r\n\n\n\n",
    "a , b . c 's d ' e n't f",  # HF's clean_up_tokenization_spaces would eat these spaces
]
TEXTS = CASES + [utf8_safe(d) for d in build_corpus()[::40]]

SHAKESPEARE = (
    "First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n\n"
    "First Citizen:\nYou are all resolved rather to die than to famish?\n\nAll:\nResolved. "
    "resolved.\n\nFirst Citizen:\nFirst, you know Caius Marcius is chief enemy to the people.\n"
)


def saved(tok, folder):
    """`tok` written to `folder`, then read back by ours, HF tokenizers and transformers."""
    save_tokenizer(tok, folder)
    assert sorted(p.name for p in folder.iterdir()) == ["tokenizer.json", "tokenizer_config.json"]
    hf = HFTokenizer.from_file(str(folder / "tokenizer.json"))
    return load_tokenizer(folder), hf, transformers.AutoTokenizer.from_pretrained(folder)


def first_difference(got: list[list[int]], want: list[list[int]]) -> str | None:
    """None when equal, else the first text whose ids differ (a readable failure)."""
    bad = next((i for i, (g, w) in enumerate(zip(got, want, strict=True)) if g != w), None)
    return None if bad is None else f"text {bad}: {TEXTS[bad][:60]!r}"


def assert_same_ids_and_text(tok, folder, *, lossless: bool) -> tuple:
    """`lossless`: every byte has a token, so the ids decode to the input text itself."""
    ours, hf, auto = saved(tok, folder)
    # Reference: the original tokenizer. HF always parses special-token text, so ours allows it.
    want = tok.encode_batch(TEXTS, allowed_special="all")
    assert first_difference(ours.encode_batch(TEXTS, allowed_special="all"), want) is None
    hf_ids = [e.ids for e in hf.encode_batch(TEXTS, add_special_tokens=False)]
    assert first_difference(hf_ids, want) is None
    auto_ids = [auto.encode(text, add_special_tokens=False) for text in TEXTS]
    assert first_difference(auto_ids, want) is None
    # Reference: the original's decode; the input text itself where no byte is dropped.
    texts = [tok.decode(ids) for ids in want]
    if lossless:
        assert texts == TEXTS
    assert [ours.decode(ids) for ids in want] == texts
    assert hf.decode_batch(want, skip_special_tokens=False) == texts
    assert auto.batch_decode(want) == texts
    # Reference: the original's roles, by id, in our reload and in transformers.
    for role in ("bos_token_id", "eos_token_id", "pad_token_id"):
        assert getattr(ours, role) == getattr(auto, role) == getattr(tok, role), role
    assert (ours.special_tokens, ours.added_tokens) == (tok.special_tokens, tok.added_tokens)
    assert (ours.add_bos_token, ours.eos_token_ids) == (tok.add_bos_token, tok.eos_token_ids)
    assert ours.chat_template == auto.chat_template == tok.chat_template
    return ours, hf, auto


# -- CharTokenizer -------------------------------------------------------------------------


def test_char_ids_equal_nanogpt_shakespeare_char():
    # nanoGPT data/shakespeare_char/prepare.py, as written there:
    data = SHAKESPEARE
    chars = sorted(list(set(data)))  # noqa: C414 (nanoGPT's own spelling)
    stoi = {ch: i for i, ch in enumerate(chars)}
    itos = {i: ch for i, ch in enumerate(chars)}
    tok = CharTokenizer.from_text(data)
    assert len(tok) == tok.vocab_size == len(chars) and tok.chars == chars
    assert tok.encode(data) == [stoi[c] for c in data]
    assert tok.decode(tok.encode(data)) == "".join(itos[i] for i in tok.encode(data)) == data


def test_char_unknown_characters_are_dropped():
    tok = CharTokenizer.from_text("hello world\n")
    ids = tok.encode("Hello, wörld!\n")  # 'H', ',', 'ö' and '!' are not in the vocabulary
    assert tok.decode(ids) == "ello wrld\n"
    assert tok.encode("<x>", allowed_special="all") == [] and tok.encode_batch(["", "o"]) == [
        [],
        [6],
    ]
    with pytest.raises(ValueError, match="not special tokens"):
        tok.encode("o", allowed_special={"<eos>"})


def test_char_interface_of_the_other_tokenizers():
    tok = CharTokenizer.from_text("héllo 😀")
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id, tok.chat_template) == (None,) * 4
    assert (tok.eos_token_ids, tok.special_tokens, tok.added_tokens) == ([], {}, {})
    assert tok.add_bos_token is False and tok.max_token_bytes == 4  # the emoji's UTF-8
    assert tok.id_to_text(tok.encode("😀")[0]) == "😀" and tok.decode_bytes([1]) == b"h"
    decoder = tok.decoder()
    ids = tok.encode("hé😀")
    assert "".join(decoder.feed(i) for i in ids) + decoder.flush() == "hé😀"
    assert prompt_ids(tok, "") == [] and prompt_ids(tok, "ho") == tok.encode("ho")
    with pytest.raises(TokenizerError, match="token id 9 is outside 0..5"):
        tok.decode([9])


def test_char_saved_reads_back_alike_in_ours_hf_and_transformers(tmp_path):
    # The vocabulary of a text that lacks most of TEXTS' characters: those are dropped by all.
    tok = CharTokenizer.from_text(SHAKESPEARE + "\t\r😀中")
    ours, _, _ = assert_same_ids_and_text(tok, tmp_path, lossless=False)
    assert isinstance(ours, CharTokenizer) and ours.chars == tok.chars


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"merges": [["a", "b"]]}, "which has no merges"),
        ({"normalizer": {"type": "NFC"}}, "which has no normalizer"),
        ({"vocab": {"ab": 0}}, "token 'ab' is not one character"),
        ({"vocab": {"a": 1}}, "token 'a' has id 1 \\(ids are dense\\)"),
    ],
)
def test_char_tokenizer_json_other_than_ours_is_one_error(tmp_path, change, message):
    save_tokenizer(CharTokenizer.from_text("ab"), tmp_path)
    data = json.loads((tmp_path / "tokenizer.json").read_text(encoding="utf-8"))
    if "normalizer" in change:
        data.update(change)
    else:
        data["model"].update(change)
    (tmp_path / "tokenizer.json").write_text(json.dumps(data), encoding="utf-8")
    where = re.escape(str(tmp_path / "tokenizer.json"))
    with pytest.raises(TokenizerError, match=f"^{where}: .*{message}"):
        load_tokenizer(tmp_path)


def test_char_model_folder_runs_tokenize_generate_perplexity_explain(tmp_path, capsys):
    tok = CharTokenizer.from_text(SHAKESPEARE)
    model = hf_gpt2(
        n_layer=1, n_embd=32, n_head=2, n_positions=64, vocab_size=tok.vocab_size,
        bos_token_id=None, eos_token_id=None,
    )  # fmt: skip
    model.save_pretrained(tmp_path)
    save_tokenizer(tok, tmp_path)
    (tmp_path / "text.txt").write_text(SHAKESPEARE, encoding="utf-8")
    m = ["--model", str(tmp_path)]
    capsys.readouterr()
    assert main(["tokenize", *m, "hear!"]) == 0
    assert capsys.readouterr().out.splitlines() == [  # '!' is not in the vocabulary
        f"{tok.encode(c)[0]:>2}  {c!r}" for c in "hear"
    ] + ["4 tokens"]
    assert main(["generate", *m, "--temp", "0", "-n", "5", "First"]) == 0
    assert set(capsys.readouterr().out) <= set(tok.chars)
    assert main(["perplexity", *m, "--context", "32", str(tmp_path / "text.txt")]) == 0
    assert "perplexity" in capsys.readouterr().out
    assert main(["explain", *m, "--top-k", "2", "speak"]) == 0
    assert "logit lens" in capsys.readouterr().out


# -- byte-level BPE ------------------------------------------------------------------------


def test_gpt2_from_vocab_merges(tmp_path):
    tok = load_tokenizer(GPT2_DIR)
    ours, _, _ = assert_same_ids_and_text(tok, tmp_path, lossless=True)
    assert ours.split_patterns == [GPT2_PATTERN] and ours.bos_token_id == 50256


def test_byte_level_from_tokenizer_json_keeps_split_ignore_merges_added_and_unk(tmp_path):
    # Llama 3's shape on GPT-2's vocabulary: a Split before a regex-less ByteLevel,
    # ignore_merges, an unknown token for the byte 0x00, a special and an added token.
    vocab = json.loads((GPT2_DIR / "vocab.json").read_text(encoding="utf-8"))
    merges = (GPT2_DIR / "merges.txt").read_text(encoding="utf-8").splitlines()[1:]
    unk = vocab.pop("Ā")  # 'Ā' is byte 0x00 in the byte alphabet; its id becomes <unk>
    vocab["<unk>"] = unk
    merges = [m for m in merges if "Ā" not in m]
    hf = HFTokenizer(
        models.BPE(
            vocab, [tuple(m.split(" ")) for m in merges], unk_token="<unk>", ignore_merges=True
        )
    )
    hf.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(LLAMA3_PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    hf.decoder = decoders.ByteLevel()
    hf.add_special_tokens([AddedToken("<|endoftext|>", special=True, normalized=False)])
    hf.add_tokens([AddedToken(" xyzzy", normalized=False)])
    (tmp_path / "source").mkdir()
    hf.save(str(tmp_path / "source" / "tokenizer.json"))
    tok = load_tokenizer(tmp_path / "source")
    assert tok.ignore_merges and tok.unk_token_id == unk and tok.added_tokens == {" xyzzy": 50257}
    ours, _, _ = assert_same_ids_and_text(tok, tmp_path / "saved", lossless=False)
    assert (ours.split_patterns, ours.ignore_merges, ours.unk_token_id) == (
        [LLAMA3_PATTERN],
        True,
        unk,
    )
    # Reference: HF on the source file, unknown byte and added token included.
    text = "say\x00 xyzzy<|endoftext|> 2024"
    assert ours.encode(text, allowed_special="all") == hf.encode(text).ids


def test_smollm2_from_gguf(tmp_path):
    tok = load_tokenizer(smollm2_gguf())
    ours, _, auto = assert_same_ids_and_text(tok, tmp_path, lossless=False)  # 0x04 has no token
    # GGUF pre "smollm": each digit alone, then GPT-2's pattern (HF: Split then ByteLevel).
    assert ours.split_patterns == tok.split_patterns == [r"\p{N}", GPT2_PATTERN]
    assert len(ours.special_tokens) == 17 and ours.eos_token_id == auto.eos_token_id == 2
    # Reference: the first save; saving what it loads writes the same bytes.
    save_tokenizer(ours, tmp_path / "again")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (tmp_path / "again" / name).read_bytes() == (tmp_path / name).read_bytes()


@pytest.mark.parametrize("kind", ["byte-level", "sentencepiece"])
def test_eos_ids_come_back_through_generation_config(tmp_path, kind):
    # tokenizer_config.json holds one eos_token; the rest go to generation_config.json's list,
    # which the model export writes (here by hand) and load_tokenizer and HF generation read.
    tok = load_tokenizer(GPT2_DIR) if kind == "byte-level" else llama2_style()
    tok.eos_token_ids.append(5)  # a second stop id, as a loader appends one
    save_tokenizer(tok, tmp_path)
    stop = {"eos_token_id": tok.eos_token_ids}
    (tmp_path / "generation_config.json").write_text(json.dumps(stop))
    assert load_tokenizer(tmp_path).eos_token_ids == tok.eos_token_ids
    assert transformers.GenerationConfig.from_pretrained(tmp_path).eos_token_id == tok.eos_token_ids


# -- SentencePiece-style BPE ---------------------------------------------------------------


def test_gemma3_from_gguf_scores_become_merges(tmp_path):
    tok = load_tokenizer(gemma3_gguf())
    assert tok.merges is None  # priority from the GGUF's scores
    ours, _, auto = assert_same_ids_and_text(tok, tmp_path, lossless=True)
    assert isinstance(ours, SentencePieceTokenizer) and ours.merges is not None
    assert (ours.unk_token_id, ours.add_space_prefix) == (tok.unk_token_id, False)
    # Reference: our prompt_ids (BOS first, as Gemma asks); transformers adds it by default.
    assert auto.encode("The capital of France is") == prompt_ids(tok, "The capital of France is")


def llama2_style() -> SentencePieceTokenizer:
    """A small Llama 2 style vocabulary: ▁ prefix on every fragment, <0xNN> for the rest."""
    tokens = ["<unk>", "<s>", "</s>", *[f"<0x{b:02X}>" for b in range(256)]]
    tokens += ["▁", "a", "b", "▁a", "ab", "▁ab", "<sep>"]
    scores = [0.0] * 259 + [-1.0, -2.0, -3.0, -4.0, -5.0, -6.0, 0.0]
    return SentencePieceTokenizer(
        tokens, scores=scores, special_tokens=["<s>", "</s>", "<unk>"], added_tokens=["<sep>"],
        bos_token_id=1, eos_token_id=2, unk_token_id=0, add_bos_token=True, add_space_prefix=True,
    )  # fmt: skip


def test_llama2_style_space_prefix_and_byte_fallback(tmp_path):
    tok = llama2_style()
    assert tok.encode("ab a<sep>b") == [264, 262, 265, 259, 261]  # ▁ab ▁a <sep> ▁ b
    ours, hf, _ = assert_same_ids_and_text(tok, tmp_path, lossless=True)
    assert ours.add_space_prefix is True
    assert hf.decode([264, 262]) == ours.decode([264, 262]) == "ab a"  # the prefix dropped


def test_refuses_what_it_cannot_write(tmp_path):
    with pytest.raises(TypeError, match="cannot save a str"):
        save_tokenizer("gpt2", tmp_path)
