"""SentencePiece-style BPE (Gemma 3 270M GGUF): ids equal llama.cpp's `llm_tokenizer_spm`
(llama-cpp-python in a child process) and HF transformers' conversion of the same file."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import GEMMA3_CACHE, gemma3_gguf
from corpus import build_corpus, llama_cpp_vectors, utf8_safe

from tinyformers.errors import TokenizerError
from tinyformers.tokenizers import from_gguf_metadata, load_tokenizer
from tinyformers.tokenizers.sentencepiece import SentencePieceTokenizer

HERE = Path(__file__).resolve().parent

# HF's ids differ from llama.cpp's on none of the 46 inputs and 2411 corpus documents (checked
# with transformers 5.24 / tokenizers 0.23.3). Where they differ, name the input and why here.
HF_DISAGREES_ON: dict[int, str] = {}


@pytest.fixture(scope="module")
def gemma():
    start = time.perf_counter()
    tok = load_tokenizer(gemma3_gguf())
    print(f"GGUF tokenizer loaded in {time.perf_counter() - start:.2f} s")
    return tok


@pytest.fixture(scope="module")
def texts():
    """The 46 llama.cpp inputs, then the corpus (lone surrogates fixed up: UTF-8 cannot hold
    them, and our encoder fixes them the same way)."""
    return [t for t, _ in llama_cpp_vectors("gpt-2")] + [utf8_safe(d) for d in build_corpus()]


@pytest.fixture(scope="module")
def ours(gemma, texts):
    return gemma.encode_batch(texts)


@pytest.fixture(scope="module")
def llama_cpp_ids(texts, request):
    """llama.cpp's ids from a child process (llama_cpp must not share one with torch); ours
    are computed while it runs (~10 s for the corpus)."""
    if importlib.util.find_spec("llama_cpp") is None:
        pytest.skip("llama-cpp-python is not installed (pip install llama-cpp-python==0.3.36)")
    child = subprocess.Popen(
        [sys.executable, str(HERE / "llama_cpp_tokenize.py")],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    child.stdin.write(json.dumps({"model": str(gemma3_gguf()), "texts": texts}))
    child.stdin.close()
    request.getfixturevalue("ours")
    out, err = child.stdout.read(), child.stderr.read()
    assert child.wait() == 0, err[-2000:]
    return json.loads(out)


@pytest.fixture(scope="module")
def hf_folder():
    return hf_tokenizer_folder()


def hf_tokenizer_folder() -> Path:
    """transformers' conversion of the GGUF's tokenizer, saved once per transformers version
    under the GGUF's cache folder (the conversion takes ~17 s on 2 cores, loading it ~1 s)."""
    import transformers

    folder = GEMMA3_CACHE / f"hf-tokenizer-{transformers.__version__}"
    if not folder.exists():
        gguf = gemma3_gguf()
        hf = transformers.AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        partial = folder.with_name(f"{folder.name}.{os.getpid()}.partial")
        hf.save_pretrained(partial)
        # model_max_length is a 31-digit integer there, which our JSON reader refuses
        config = json.loads((partial / "tokenizer_config.json").read_text())
        config.pop("model_max_length", None)
        (partial / "tokenizer_config.json").write_text(json.dumps(config))
        try:  # renamed whole: the other test worker sees no folder or the finished one
            partial.rename(folder)
        except OSError:  # that worker renamed its own first: the same files
            shutil.rmtree(partial)
    return folder


@pytest.fixture(scope="module")
def hf(hf_folder):
    """The conversion as HF `tokenizers` runs it (what transformers' GemmaTokenizer calls)."""
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(hf_folder / "tokenizer.json"))


@pytest.fixture(scope="module")
def hf_ids(hf, texts):
    return [e.ids for e in hf.encode_batch(texts, add_special_tokens=False)]


def test_gguf_metadata(gemma):
    assert isinstance(gemma, SentencePieceTokenizer) and len(gemma) == 262_144
    assert (gemma.bos_token_id, gemma.eos_token_id, gemma.unk_token_id) == (2, 1, 3)
    assert (gemma.bos_token, gemma.eos_token, gemma.pad_token) == ("<bos>", "<eos>", "<pad>")
    assert gemma.add_bos_token is True and gemma.add_space_prefix is False
    assert repr(gemma).startswith("SentencePieceTokenizer(") and gemma.chat_template is None


def test_capital_of_france_with_one_bos(gemma):
    # HF and llama.cpp both give these ids, with BOS; encode leaves BOS to the caller.
    ids = gemma.encode("The capital of France is")
    assert [gemma.bos_token_id, *ids] == [2, 818, 5279, 529, 7001, 563]
    assert gemma.decode(ids) == "The capital of France is"


def test_matches_llama_cpp_on_vectors_and_corpus(ours, llama_cpp_ids, texts):
    assert len(texts) == 46 + len(build_corpus())
    wrong = [i for i, (a, b) in enumerate(zip(ours, llama_cpp_ids, strict=True)) if a != b]
    assert wrong == [], [texts[i][:80] for i in wrong[:5]]


def test_matches_hf_conversion_except_named_inputs(ours, hf_ids, llama_cpp_ids):
    disagree = {i for i, (a, b) in enumerate(zip(hf_ids, llama_cpp_ids, strict=True)) if a != b}
    assert disagree == set(HF_DISAGREES_ON)
    assert all(ours[i] == hf_ids[i] for i in range(len(ours)) if i not in disagree)
    assert all(ours[i] == llama_cpp_ids[i] for i in disagree)


def test_tokenizer_json_from_hf_conversion_gives_the_same_ids(hf_folder, ours, texts):
    tok = load_tokenizer(hf_folder)  # BPE with byte_fallback: priority from the merge ranks
    assert isinstance(tok, SentencePieceTokenizer) and tok._pair_ranks is not None
    assert (tok.bos_token_id, tok.add_bos_token, tok.add_space_prefix) == (2, True, False)
    assert tok.encode_batch(texts[:400]) == ours[:400]


def test_round_trip_on_corpus(gemma, ours, texts):
    assert all(gemma.decode(ids) == text for ids, text in zip(ours, texts, strict=True))


def test_byte_fallback_and_streaming_keep_whole_characters(gemma):
    text = "a\U00020000b \U0002a6d6 中文 😀\x00"  # the two CJK extension chars have no token
    ids = gemma.encode(text)
    byte_ids = [i for i in ids if gemma.id_to_text(i) == "\ufffd"]
    assert len(byte_ids) == 8  # 4 UTF-8 bytes each, as <0xNN> tokens
    decoder = gemma.decoder()
    pieces = [decoder.feed(i) for i in ids] + [decoder.flush()]
    assert "".join(pieces) == text == gemma.decode(ids)
    assert "\ufffd" not in "".join(pieces)


def test_invalid_utf8_decodes_like_python_not_hf_byte_fallback(gemma, hf):
    # Named difference: HF's ByteFallback decoder turns a run of byte tokens that is not valid
    # UTF-8 into one U+FFFD per byte; we (and llama.cpp's bytes decoded by Python) replace
    # each maximal invalid part, which is what streaming gives too.
    ids = [gemma.encode("中")[0], *[238 + b for b in "中".encode()[:2]], 238 + 0xFF]
    assert gemma.decode(ids) == "中\ufffd\ufffd"
    assert hf.decode(ids) == "中\ufffd\ufffd\ufffd"


def test_control_tokens_are_text_unless_allowed_added_tokens_always_match(gemma):
    text = "<start_of_turn>user\n<table>  x"
    plain = gemma.encode(text)
    assert gemma.special_tokens["<start_of_turn>"] not in plain
    assert gemma.added_tokens["<table>"] in plain and gemma.added_tokens["  "] in plain
    assert gemma.encode(text, allowed_special="all")[0] == gemma.special_tokens["<start_of_turn>"]
    assert gemma.decode(plain) == text


def _tiny(**changes) -> SentencePieceTokenizer:
    """Llama-2 style: space prefix, bytes for 'é', no byte token for "€" (so <unk>)."""
    tokens = ["<unk>", "<s>", "</s>", "▁", "a", "b", "▁a", "ab", "▁ab"]
    tokens += [f"<0x{b:02X}>" for b in "é".encode()]
    scores = [0.0, 0.0, 0.0, -1.0, -2.0, -3.0, -4.0, -5.0, -6.0, 0.0, 0.0]
    args = dict(scores=scores, bos_token_id=1, eos_token_id=2, unk_token_id=0)
    return SentencePieceTokenizer(tokens, **{**args, "add_space_prefix": True, **changes})


def test_score_priority_space_prefix_and_unknown():
    tok = _tiny()
    # '▁ab': ▁a (-4) beats ab (-5), then ▁a+b = ▁ab (-6)
    assert tok.encode("ab") == [8]
    assert tok.encode("aé €") == [6, 9, 10, 3, 0, 0, 0]  # €: 3 bytes without byte tokens
    assert tok.decode(tok.encode("ab a")) == "ab a"  # the prefix space is dropped
    assert tok.decoder().feed(8) == " ab"  # streaming continues a text: nothing dropped


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"tokenizer.ggml.scores": [0.0]}, r"expected 262144 scores, got 1"),
        ({"tokenizer.ggml.scores": "x"}, r"expected 262144 scores, got str"),
        ({"tokenizer.ggml.bos_token_id": 262144}, r"bos token id 262144 is outside"),
        ({"tokenizer.ggml.add_space_prefix": "no"}, r"add_space_prefix 'no' is not a boolean"),
        ({"tokenizer.ggml.tokens": ["a", "a"]}, r"tokenizer\.ggml\.token_type has 262144 entries"),
        ({"tokenizer.ggml.tokens": 5}, r"tokenizer\.ggml\.tokens is missing or not a list"),
    ],
)
def test_malformed_metadata_is_one_error(gemma_metadata, change, message):
    with pytest.raises(TokenizerError, match=rf"^g\.gguf: {message}"):
        from_gguf_metadata({**gemma_metadata, **change}, "g.gguf")


def test_nan_score_and_duplicate_token():
    with pytest.raises(TokenizerError, match="score is not finite"):
        _tiny(scores=[float("nan")] * 11)
    with pytest.raises(TokenizerError, match="listed twice"):
        SentencePieceTokenizer(["a", "a"], scores=[0.0, 0.0])


@pytest.fixture(scope="module")
def gemma_metadata():
    from tinyformers.loading.gguf import read_gguf

    with read_gguf(gemma3_gguf()) as gguf:
        return {k: v for k, v in gguf.metadata.items() if k.startswith("tokenizer.")}
