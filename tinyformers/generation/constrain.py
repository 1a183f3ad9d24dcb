"""Constrained decoding: a grammar says which tokens may come next, so the text parses.

A `Grammar` comes from a JSON schema (`json_schema`), "any JSON object" (`json_object`) or a
Lark grammar (`lark`: a tool call inside its model's markers). Each sequence follows it with its
own `Matcher`: `mask(logits)` sets every token the grammar forbids to -inf before sampling,
`accept(token)` moves on. EOS is allowed only where the grammar may end, and once the grammar
is complete EOS is all that is allowed.

The engine is llguidance (Microsoft, MIT; behind guidance, and in vLLM, SGLang and llama.cpp).
`python -m benchmarks.grammar` measured it against xgrammar 0.2.9 and outlines-core 0.2.14 on
SmolLM2's 49,152 tokens (a 71-token answer to a 6-property schema, medians, 2 shared cores):
- the mask per token: llguidance 0.010 ms, xgrammar 0.002, outlines-core 0.002 (0.04 ms, and
  0.4 ms to follow a token, under "any object"). Putting the mask onto the logits is 0.05 ms
  for all three. A SmolLM2 decode step on CPU is 30-100 ms: any of them is well under 1%.
- per request: llguidance starts a matcher in 0.3-0.6 ms; xgrammar compiles in 8 ms (cached
  after); outlines-core indexes the whole vocabulary: 0.2 s for that schema, 4.3 s for "any
  object".
- 34 JSON Schema keywords: llguidance enforced 27 and refused the other 7 by name
  (uniqueItems, contains, oneOf with overlapping branches, not, if/then, propertyNames,
  dependentRequired). xgrammar enforced 26, refused valid documents under patternProperties
  and silently ignored 7 (uniqueItems, contains, oneOf, allOf, not, if/then,
  dependentRequired); outlines-core enforced 17 and ignored 11 (minimum and multipleOf among
  them).
llguidance is the one that never lets through a schema it does not enforce: `check` turns its
refusal into a one-line error that names the keyword.

Example:
    >>> grammar = json_schema({"type": "object", "properties": {"a": {"type": "integer"}}})
    >>> check(grammar, tokenizer, model.config.vocab_size, model.eos_ids)
    >>> matcher = Matcher(grammar, tokenizer, model.config.vocab_size, model.eos_ids)
    >>> token = sample(matcher.mask(logits)); matcher.accept(token)
"""

from __future__ import annotations

import json
import re
import threading
import weakref
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from llguidance import LLMatcher, LLTokenizer, TokenizerWrapper
from torch import Tensor

from tinyformers.errors import TinyformersError

# subtle: no free whitespace between JSON tokens (llguidance's default allows any amount): a
# small model can fill max_tokens with newlines. Separators as json.dumps writes them.
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}

_BITS = torch.arange(32, dtype=torch.int32)  # bit i of a mask word is token 32 * word + i


class GrammarError(TinyformersError, ValueError):
    """A schema or grammar the engine cannot enforce (or that is not valid), or a token it
    refused."""


@dataclass(frozen=True)
class Grammar:
    """A grammar in llguidance's serialized form; `source` says what it was made from."""

    text: str
    source: str


def json_schema(schema: dict | bool) -> Grammar:
    """Exactly the JSON values `schema` accepts (JSON Schema draft 2020-12)."""
    try:
        text = LLMatcher.grammar_from_json_schema(schema, defaults=JSON_OPTIONS)
    except (TypeError, ValueError) as e:  # not a JSON object: a NaN, a set ...
        raise GrammarError(f"the schema is not JSON: {_one_line(e)}") from None
    return Grammar(text, "schema")


def json_object() -> Grammar:
    """Any JSON object (OpenAI's JSON mode: `{"type": "json_object"}`)."""
    return json_schema({"type": "object"})


def lark(source: str) -> Grammar:
    """A Lark grammar in llguidance's dialect; `%json {schema}` embeds a JSON schema.

    Example:
        >>> lark('start: "<tool_call>\\n" %json {"type": "object"} "\\n</tool_call>"')
    """
    return Grammar(LLMatcher.grammar_from_lark(source), "grammar")


def check(grammar: Grammar, tokenizer, n_vocab: int, eos_ids: Iterable[int]) -> None:
    """Raise GrammarError (one line) unless the engine can enforce all of `grammar`.

    Example:
        >>> check(json_schema({"type": "array", "uniqueItems": True}), tok, 49152, {2})
        GrammarError: uniqueItems cannot be enforced while decoding
    """
    error = LLMatcher.validate_grammar(grammar.text, _vocabulary(tokenizer, n_vocab, eos_ids))
    if error:
        raise GrammarError(_explain(error))


class Matcher:
    """One sequence's place in a grammar: which tokens may come next, and what came.

    Tokens past the tokenizer's vocabulary (a model's padding rows) are never allowed.
    """

    def __init__(self, grammar: Grammar, tokenizer, n_vocab: int, eos_ids: Iterable[int]):
        self._matcher = LLMatcher(
            _vocabulary(tokenizer, n_vocab, eos_ids), grammar.text, log_level=0
        )
        if self._matcher.is_error():
            raise GrammarError(_explain(self._matcher.get_error()))
        self.n_vocab = n_vocab
        self._words = torch.zeros((n_vocab + 31) // 32, dtype=torch.int32)  # one bit a token

    def allowed(self) -> Tensor:
        """(n_vocab,) bool: the tokens the grammar allows next."""
        self._matcher.unsafe_compute_mask_ptr(self._words.data_ptr(), self._words.numel() * 4)
        bits = (self._words.unsqueeze(-1) >> _BITS) & 1  # (words, 32)
        return bits.flatten()[: self.n_vocab].bool()

    def mask(self, logits: Tensor) -> Tensor:
        """`logits` (..., n_vocab) with every token the grammar forbids at -inf (a new tensor:
        the model's own values stay for log-probabilities)."""
        allowed = self.allowed().to(logits.device)
        return logits.masked_fill(~allowed, -torch.inf)

    def accept(self, token: int) -> None:
        """Follow `token`; GrammarError if the grammar did not allow it."""
        if not self._matcher.consume_token(token):
            raise GrammarError(f"token {token} breaks the grammar: {self._matcher.get_error()}")

    @property
    def done(self) -> bool:
        """True once nothing but EOS may follow."""
        return self._matcher.is_stopped()

    @property
    def accepting(self) -> bool:
        """True where the text so far is complete (EOS would be allowed)."""
        return self._matcher.is_accepting()


# -- the tokenizer as llguidance sees it ---------------------------------------------------------

_vocabularies: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_lock = threading.Lock()


def _vocabulary(tokenizer, n_vocab: int, eos_ids: Iterable[int]) -> LLTokenizer:
    """llguidance's view of `tokenizer` (each token's bytes), built once per tokenizer (about
    0.1 s for 49,152 tokens)."""
    eos = sorted(eos_ids)
    key = (n_vocab, tuple(eos))
    with _lock:
        built = _vocabularies.setdefault(tokenizer, {})
        if key not in built:
            tokens = _Tokens(tokenizer, n_vocab, eos)
            built[key] = LLTokenizer(tokens, n_vocab=n_vocab, eos_token=eos)
        return built[key]


class _Tokens(TokenizerWrapper):
    """What llguidance's TokenizerWrapper reads: each token's bytes, which ones are control
    tokens (never matched as text: a `<|im_end|>` inside a JSON string stays text), and an
    encoder."""

    def __init__(self, tokenizer, n_vocab: int, eos: list[int]) -> None:
        self._tokenizer = tokenizer
        self.eos_token_id = eos[0] if eos else tokenizer.eos_token_id
        self.bos_token_id = tokenizer.bos_token_id
        known = min(tokenizer.vocab_size, n_vocab)
        # rows of the model past the tokenizer are padding: empty, so no text reaches them
        self.tokens = [tokenizer.decode_bytes([i]) for i in range(known)]
        self.tokens += [b""] * (n_vocab - known)
        self.special_token_ids = sorted(i for i in tokenizer.special_tokens.values() if i < n_vocab)
        self.is_tokenizer_wrapper = True
        self._accepts_bytes = False

    def _encode_string(self, s: str) -> list[int]:
        return self._tokenizer.encode(s)

    __call__ = _encode_string


def _explain(error: str) -> str:
    """llguidance's message as one line that names the keyword where it can (a schema inside
    a Lark grammar, as a forced tool call's, reports it after the rule's place)."""
    if m := re.search(r"Unimplemented keys: (\[[^\]]*\])", error):
        keys = ", ".join(json.loads(m.group(1)))
        return f"{keys} cannot be enforced while decoding"
    if "oneOf constraints are not supported" in error:
        return "oneOf whose branches overlap cannot be enforced while decoding (use anyOf)"
    return _one_line(error)


def _one_line(text) -> str:
    return " ".join(str(text).split())[:300]
