"""The grammar engines we could constrain decoding with, on SmolLM2's 49,152-token vocabulary.

    pip install llguidance xgrammar outlines-core jsonschema
    python -m benchmarks.grammar

For each engine installed: the time to build its view of the vocabulary, to compile a grammar,
to start a matcher, and per token of a 71-token answer (a 6-property schema) and of the same
answer under "any object": the mask (`fill`), the mask onto the logits (`apply`, the same code
for all) and following the token (`accept`); medians over 5 answers. Then what it does with
34 JSON Schema keywords: enforced (the good document passes, the bad one is stopped), refused
(compiling fails, naming it) or IGNORED (the bad document passes). tinyformers uses llguidance:
see generation/constrain.py for why.
"""

from __future__ import annotations

import importlib
import json
import statistics
import time

import torch

import tinyformers

tok = tinyformers.load_tokenizer("smollm2")
SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 40},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "city": {"type": "string", "enum": ["Paris", "London", "Tokyo"]},
        "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 4},
        "address": {
            "type": "object",
            "properties": {
                "street": {"type": "string"},
                "zip": {"type": "string", "pattern": "^[0-9]{5}$"},
            },
            "required": ["street", "zip"],
            "additionalProperties": False,
        },
        "score": {"type": "number"},
    },
    "required": ["name", "age", "city", "tags", "address", "score"],
    "additionalProperties": False,
}
ANSWER = {
    "name": "Marie Curie",
    "age": 66,
    "city": "Paris",
    "tags": ["physics", "chemistry", "radium"],
    "address": {"street": "11 rue Pierre et Marie Curie", "zip": "75005"},
    "score": 9.75,
}

S = dict
KEYWORDS = [  # (keyword, schema, a document it accepts, one it does not)
    ("pattern", S(type="string", pattern="^[a-c]+$"), "abc", "abd"),
    ("format: date-time", S(type="string", format="date-time"), "2024-01-01T10:00:00Z", "x"),
    ("format: email", S(type="string", format="email"), "a@b.com", "nope"),
    ("format: uuid", S(type="string", format="uuid"), "123e4567-e89b-12d3-a456-426614174000", "x"),
    ("format: date", S(type="string", format="date"), "2024-01-01", "x"),
    ("format: uri", S(type="string", format="uri"), "http://a.b/c", "not a uri"),
    ("minLength", S(type="string", minLength=3), "abc", "ab"),
    ("maxLength", S(type="string", maxLength=3), "abc", "abcd"),
    ("minimum", S(type="integer", minimum=3), 3, 2),
    ("exclusiveMaximum", S(type="integer", exclusiveMaximum=3), 2, 3),
    ("minimum (number)", S(type="number", minimum=1.5), 1.5, 1.25),
    ("multipleOf", S(type="integer", multipleOf=3), 6, 7),
    ("minItems", S(type="array", items={"type": "integer"}, minItems=2), [1, 2], [1]),
    ("maxItems", S(type="array", items={"type": "integer"}, maxItems=1), [1], [1, 2]),
    ("uniqueItems", S(type="array", items={"type": "integer"}, uniqueItems=True), [1, 2], [1, 1]),
    ("contains", S(type="array", contains={"const": 5}), [5], [1]),
    ("prefixItems", S(type="array", prefixItems=[{"type": "string"}]), ["a", 1], [1, 1]),
    ("enum", S(enum=["a", 1]), "a", "b"),
    ("const", S(const="a"), "a", "b"),
    ("anyOf", S(anyOf=[{"type": "string"}, {"type": "integer"}]), 1, 1.5),
    (
        "oneOf",
        S(oneOf=[{"type": "integer", "minimum": 0}, {"type": "integer", "maximum": 5}]),
        7,
        3,
    ),
    (
        "allOf",
        S(allOf=[{"type": "integer", "minimum": 0}, {"type": "integer", "maximum": 5}]),
        3,
        7,
    ),
    ("not", {"type": "integer", "not": {"const": 3}}, 2, 3),
    ("if/then", {"type": "integer", "if": {"minimum": 5}, "then": {"multipleOf": 2}}, 6, 7),
    (
        "$ref (recursive)",
        {
            "$defs": {
                "n": {
                    "type": "object",
                    "properties": {"k": {"$ref": "#/$defs/n"}},
                    "additionalProperties": False,
                }
            },
            "$ref": "#/$defs/n",
        },
        {"k": {"k": {}}},
        {"k": {"j": 1}},
    ),
    (
        "additionalProperties: false",
        S(type="object", properties={"a": {"type": "integer"}}, additionalProperties=False),
        {"a": 1},
        {"b": 1},
    ),
    (
        "additionalProperties",
        S(type="object", additionalProperties={"type": "integer"}),
        {"x": 1},
        {"x": "s"},
    ),
    ("required", S(type="object", properties={"a": {}}, required=["a"]), {"a": 1}, {}),
    (
        "patternProperties",
        S(type="object", patternProperties={"^x": {}}, additionalProperties=False),
        {"xa": 1},
        {"ya": 1},
    ),
    ("propertyNames", S(type="object", propertyNames={"pattern": "^[a-z]+$"}), {"ab": 1}, {"A": 1}),
    ("minProperties", S(type="object", minProperties=1), {"a": 1}, {}),
    ("maxProperties", S(type="object", maxProperties=1), {"a": 1}, {"a": 1, "b": 2}),
    (
        "dependentRequired",
        S(type="object", dependentRequired={"a": ["b"]}),
        {"a": 1, "b": 1},
        {"a": 1},
    ),
    ("type: [list]", S(type=["string", "null"]), None, 1),
]


def llguidance_engine(tokens, special, eos):
    from llguidance import LLMatcher, LLTokenizer, TokenizerWrapper

    class Vocabulary:
        eos_token_id, bos_token_id = eos[0], None
        special_token_ids = special

        def __call__(self, s):
            return tok.encode(s.decode() if isinstance(s, bytes) else s)

    Vocabulary.tokens = tokens
    options = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
    vocab = LLTokenizer(TokenizerWrapper(Vocabulary()), n_vocab=len(tokens), eos_token=eos)

    def compile_(schema):
        grammar = LLMatcher.grammar_from_json_schema(schema, defaults=options)
        if error := LLMatcher.validate_grammar(grammar, vocab):
            raise ValueError(error)
        return grammar

    def fill(m, words):
        m.unsafe_compute_mask_ptr(words.data_ptr(), words.numel() * 4)

    def accept(m, token):
        return m.consume_token(token)

    return compile_, lambda g: LLMatcher(vocab, g, log_level=0), fill, accept


def xgrammar_engine(tokens, special, eos):
    import xgrammar

    info = xgrammar.TokenizerInfo(tokens, xgrammar.VocabType.RAW, stop_token_ids=eos)
    compiler = xgrammar.GrammarCompiler(info, max_threads=1)

    def compile_(schema):
        # strict_mode (its default) would forbid what the schema allows (extra properties, items)
        schema = json.dumps(schema)
        return compiler.compile_json_schema(schema, any_whitespace=False, strict_mode=False)

    def fill(m, words):
        m.fill_next_token_bitmask(words[None])

    return compile_, xgrammar.GrammarMatcher, fill, lambda m, t: m.accept_token(t)


def outlines_engine(tokens, special, eos):
    import outlines_core
    from outlines_core.kernels.torch import fill_next_token_bitmask

    ids: dict[bytes, list[int]] = {}
    for i, b in enumerate(tokens):
        if i not in special:
            ids.setdefault(b, []).append(i)
    vocab = outlines_core.Vocabulary(eos[0], ids)

    def compile_(schema):
        regex = outlines_core.json_schema.build_regex_from_schema(json.dumps(schema), r"( )?")
        return outlines_core.Index(regex, vocab)

    def accept(g, token):
        if token not in g.get_tokens():
            return False
        g.advance(token)
        return True

    return compile_, outlines_core.Guide, lambda g, w: fill_next_token_bitmask(g, w[None]), accept


ENGINES = {  # name: (module, its setup here)
    "llguidance": ("llguidance", llguidance_engine),
    "xgrammar": ("xgrammar", xgrammar_engine),
    "outlines-core": ("outlines_core", outlines_engine),
}
BITS = torch.arange(32, dtype=torch.int32)


def timings(engine, schema, eos: int, repeats: int = 5) -> str:
    compile_, start, fill, accept = engine
    ids = tok.encode(json.dumps(ANSWER)) + [eos]
    words = torch.zeros((tok.vocab_size + 31) // 32, dtype=torch.int32)
    logits = torch.randn(tok.vocab_size)
    t = time.perf_counter()
    grammar = compile_(schema)
    compile_ms = 1e3 * (time.perf_counter() - t)
    starts, fills, applies, accepts = [], [], [], []
    for _ in range(repeats):
        t = time.perf_counter()
        matcher = start(grammar)
        starts.append(time.perf_counter() - t)
        for token in ids:
            t0 = time.perf_counter()
            fill(matcher, words)
            t1 = time.perf_counter()
            allowed = ((words.unsqueeze(-1) >> BITS) & 1).flatten()[: tok.vocab_size].bool()
            logits.masked_fill(~allowed, -torch.inf)
            t2 = time.perf_counter()
            assert allowed[token], tok.decode([token])
            if token != eos:
                accept(matcher, token)
            accepts.append(time.perf_counter() - t2)
            fills.append(t1 - t0)
            applies.append(t2 - t1)

    def ms(values):
        return f"{1e3 * statistics.median(values):.3f}"

    return (
        f"compile {compile_ms:7.1f} ms  start {ms(starts)} ms  per token: fill {ms(fills)} "
        f"apply {ms(applies)} accept {ms(accepts)} ms"
    )


def coverage(engine, eos: int) -> list[tuple[str, str]]:
    compile_, start, fill, accept = engine
    words = torch.zeros((tok.vocab_size + 31) // 32, dtype=torch.int32)
    rows = []
    for keyword, schema, good, bad in KEYWORDS:
        try:
            grammar = compile_(schema)
        except Exception as e:  # each engine raises its own kind
            rows.append((keyword, "refused: " + " ".join(str(e).split())[:70]))
            continue

        def passes(document, grammar=grammar):
            """Every token of `document` followed, and then EOS allowed."""
            matcher = start(grammar)
            if not all(accept(matcher, i) for i in tok.encode(json.dumps(document))):
                return False
            fill(matcher, words)
            return bool((words[eos // 32] >> (eos % 32)) & 1)

        ok, leaks = passes(good), passes(bad)
        rows.append((keyword, "IGNORED" if leaks else "enforced" if ok else "rejects valid"))
    return rows


def main() -> None:
    torch.set_num_threads(1)
    tokens = [tok.decode_bytes([i]) for i in range(tok.vocab_size)]
    special = sorted(tok.special_tokens.values())
    eos = tok.eos_token_ids
    table = {}
    for name, (module, make) in ENGINES.items():
        try:
            importlib.import_module(module)  # apart from the timing: xgrammar imports triton
        except ImportError:
            print(f"{name}: not installed")
            continue
        t = time.perf_counter()
        engine = make(tokens, special, eos)
        print(f"{name}: vocabulary {1e3 * (time.perf_counter() - t):.0f} ms")
        print(f"  schema      {timings(engine, SCHEMA, eos[0])}")
        print(f"  any object  {timings(engine, {'type': 'object'}, eos[0])}")
        table[name] = dict(coverage(engine, eos[0]))
    names = list(table)
    print(f"\n{'keyword':28} " + " ".join(f"{n:24}" for n in names))
    for keyword, *_ in KEYWORDS:
        print(f"{keyword:28} " + " ".join(f"{table[n][keyword][:24]:24}" for n in names))


if __name__ == "__main__":
    main()
