"""Chat templates: the Jinja program a model ships to turn messages into its prompt text.

Rendered the way Hugging Face's `apply_chat_template` does (same sandbox, options and helpers),
so a template written for transformers gives the same text here; then encoded so that only the
control tokens the template itself writes become control tokens.

A template is a program from a stranger. Jinja's sandbox stops it reaching Python's internals;
`_LimitedSandbox` also bounds what it may cost: rendering stops after `MAX_SECONDS` (checked
on every template line and Python call), strings and lists built by `*`, `+`, `~`, `%`, `**`,
size arguments (`center(10**9)`, `replace`) and the filters that build text or lists (`sum`,
`join`, `tojson`, `indent`, `string` ...) stay under `MAX_CHARS` characters (lists under
`MAX_ITEMS` items), and so does the output. The size of what an operation will build is
checked before it is built: C code (str() of a list, json.dumps) runs where the deadline
cannot look. Every failure, whatever Python raised inside, is one TemplateError naming the
model.
"""

from __future__ import annotations

import json
import re
import sys
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from datetime import datetime
from functools import lru_cache, wraps
from itertools import chain

import jinja2
import jinja2.ext
import regex
from jinja2.compiler import CodeGenerator
from jinja2.filters import make_attrgetter
from jinja2.sandbox import ImmutableSandboxedEnvironment
from jinja2.utils import generate_lorem_ipsum, pass_environment

from tinyformers.errors import TemplateError, TinyformersError
from tinyformers.tokenizers.bpe import Literals

MAX_SECONDS = 0.5  # real templates render in about a millisecond
MAX_CHARS = 4 * 2**20  # of any one string the template builds, and of the output
# of any one list: its items may each be a new object (str of an int: ~50 bytes), so 4M of
# them would be ~200 MB where 4M characters are 4-16 MB
MAX_ITEMS = 2**20
MAX_PPRINT_CHARS = 2**16  # pprint wraps line by line in Python, where the deadline cannot look
MAX_TEMPLATE_CHARS = 2**17  # real templates, tool use included, are under 20K characters

Message = dict[str, str]  # {"role": "system" | "user" | "assistant", "content": text}

# Private-use characters that wrap control-token text found in messages (Hugging Face's markers).
_START, _END = "\ue000", "\ue001"


def render_chat(
    template: str,
    messages: list[Message],
    *,
    add_generation_prompt: bool = True,
    bos_token: str | None = None,
    eos_token: str | None = None,
    tools: list[dict] | None = None,
    source: str = "chat template",
) -> str:
    """The prompt text `template` makes of `messages`, as `apply_chat_template(tokenize=False)`.

    `tools` are the function schemas as transformers passes them (OpenAI's
    `{"type": "function", "function": {...}}` entries); None when there are none.

    A template that calls `raise_exception` (say, a role it does not support) or breaks Jinja
    raises TinyformersError naming `source`.

    Example:
        >>> render_chat("{% for m in messages %}{{ m.role }}: {{ m.content }}\\n{% endfor %}",
        ...             [{"role": "user", "content": "hi"}])
        'user: hi\\n'
    """
    # Hugging Face drops None values: templates test `'key' in message`, not `is none`.
    messages = [{k: v for k, v in m.items() if v is not None} for m in messages]
    # A tokenizer without a BOS leaves `bos_token` undefined (renders ""), never "None".
    tokens = {
        k: v for k, v in [("bos_token", bos_token), ("eos_token", eos_token)] if v is not None
    }
    # the messages themselves may be long: the output may hold them a few times over
    limit = MAX_CHARS + 4 * sum(len(str(v)) for m in messages for v in m.values())
    try:
        if len(template) > MAX_TEMPLATE_CHARS:
            raise _LimitError(f"{len(template)} characters, over the {MAX_TEMPLATE_CHARS} limit")
        compiled = _compile(template)
        with _deadline(time.monotonic() + MAX_SECONDS):
            chunks = compiled.generate(
                messages=messages,
                tools=tools,  # passed even when None: templates test `tools is not none`
                documents=None,
                add_generation_prompt=add_generation_prompt,
                **tokens,
            )
            out, size = [], 0
            for chunk in chunks:
                size += len(chunk)
                if size > limit:
                    raise _LimitError(f"the output passes {limit} characters")
                out.append(chunk)
            return "".join(out)
    except Exception as e:  # raise_exception, a syntax error, a sandbox violation, a limit, or
        # anything Python raises inside (ZeroDivisionError, RecursionError, TypeError ...)
        where = f" (line {e.lineno})" if getattr(e, "lineno", None) else ""
        kind = "" if isinstance(e, jinja2.TemplateError) else f"{type(e).__name__}: "
        message = " ".join(str(e).split())[:300]  # one line, whatever the template wrote
        raise TemplateError(f"{source}: chat template error{where}: {kind}{message}") from e


def encode_chat(
    tokenizer,
    messages: list[Message],
    *,
    add_generation_prompt: bool = True,
    tools: list[dict] | None = None,
) -> list[int]:
    """The token ids of `messages` (and `tools`, see `render_chat`) rendered with the
    tokenizer's chat template.

    No BOS is added: the template writes every control token the model expects, and
    llama-cpp-python #1501 shows what a second BOS does. Control-token text typed inside a
    message is encoded as plain text, so a user cannot end a turn or forge a system message
    (Hugging Face's `sanitize_control_tokens=True` gives the same ids).
    """
    if tokenizer.chat_template is None:
        raise TinyformersError(
            f"{tokenizer.source}: no chat template (tokenizer.chat_template in a GGUF file or "
            "chat_template in tokenizer_config.json); this looks like a base model: use "
            "`tinyformers generate`"
        )
    literals = tokenizer.literals
    text = render_chat(
        tokenizer.chat_template,
        _mark(messages, literals),
        add_generation_prompt=add_generation_prompt,
        bos_token=tokenizer.bos_token,
        eos_token=tokenizer.eos_token,
        tools=None if tools is None else _mark(tools, literals),
        source=tokenizer.source,
    )
    # re.split with one group gives [text, marked token, text, ...]; a marker the template cut
    # off its token gives None there. Both kinds still split the text, as Hugging Face does.
    pieces = _MARKED.split(text)
    ids: list[int] = []
    for i, piece in enumerate(pieces):
        if piece:
            ids += tokenizer.encode(piece, allowed_special=frozenset() if i % 2 else "all")
    return ids


def _mark(value, literals: Literals):
    """Wrap each control token in the strings of `value` with the markers (dropping forged
    ones), inside lists and dicts too: a tool's schema or a call's arguments are the user's."""
    if isinstance(value, list):
        return [_mark(v, literals) for v in value]
    if isinstance(value, dict):
        return {_mark(k, literals): _mark(v, literals) for k, v in value.items()}
    if not isinstance(value, str):
        return value
    value = value.replace(_START, "").replace(_END, "")
    parts, start = [], 0
    for begin, end in literals.find(value, literals.special, added=False):
        parts += [value[start:begin], _START, value[begin:end], _END]
        start = end
    return "".join(parts) + value[start:]


# A marked piece, or a marker the template cut off its token (or wrote itself): the text
# between two markers is the user's, encoded as plain text, whatever it holds.
_MARKED = re.compile(f"{_START}([^{_START}{_END}]*){_END}|[{_START}{_END}]")


class _LimitError(jinja2.TemplateError):
    """A template went past MAX_SECONDS or MAX_CHARS."""


@contextmanager
def _deadline(deadline: float) -> Iterator[None]:
    """Raise _LimitError on the first template line or Python call after `deadline`.

    subtle: a nested loop over range(10**5) runs no Python call in its body, so the
    check sits on the template's own lines too (a local tracer for its frames only).
    The caller's tracer (a debugger, coverage) is put back afterwards.
    """

    def on_line(frame, event, arg):
        if time.monotonic() > deadline:
            raise _LimitError(f"rendering took over {MAX_SECONDS} s")
        return on_line

    def on_call(frame, event, arg):
        if time.monotonic() > deadline:
            raise _LimitError(f"rendering took over {MAX_SECONDS} s")
        return on_line if frame.f_code.co_filename == "<template>" else None

    previous = sys.gettrace()
    sys.settrace(on_call)
    try:
        yield
    finally:
        sys.settrace(previous)


def _check_length(n: int, limit: int = MAX_CHARS) -> None:
    if n > limit:
        raise _LimitError(f"a value of {n} items passes the {limit} limit")


def _check_size(value):
    """`value` if it is not a string over MAX_CHARS or a list over MAX_ITEMS."""
    if isinstance(value, str | bytes):
        _check_length(len(value))
    elif isinstance(value, list | tuple):
        _check_length(len(value), MAX_ITEMS)
    return value


def _check_sizes(args, kwargs) -> None:
    """No size argument (a width, a count) over MAX_CHARS: 'x'.center(10**9) takes a GB."""
    for v in (*args, *kwargs.values()):
        if isinstance(v, int) and not -MAX_CHARS <= v <= MAX_CHARS:
            raise _LimitError(f"argument {v} passes the {MAX_CHARS} size limit")


def _check_text(values: Iterable, extra: int = 0, limit: int = MAX_CHARS) -> None:
    """Refuse, before it is built, the text of `values` (str() of each, plus `extra`
    characters) if it would pass `limit`.

    subtle: str() of `[l] * 30`, l a list of 4M items, is 360M characters built in C, where
    the deadline cannot look. A lower bound on the length (a string its length, a list its
    brackets and separators, anything else 1) is summed while walking; the walk stops at the
    limit, so it costs at most a few million steps however large or self-sharing the value
    is, and a flat list of strings or numbers is counted in C.
    """
    size, stack = extra, []
    if (flat := _flat_size(values)) is not None:
        size += flat
    else:
        stack.append(iter(values))
    while stack and size <= limit:
        value = next(stack[-1], _END_OF_ITEMS)
        if value is _END_OF_ITEMS:
            stack.pop()
        elif isinstance(value, str):
            size += len(value)
        elif isinstance(value, dict):
            stack.append(iter(value.items()))  # each (k, v) as a pair: ": " and ", "
        elif isinstance(value, list | tuple | set | frozenset):
            size += 2 * len(value)  # brackets and ", "
            if size > limit:
                break
            if (flat := _flat_size(value)) is not None:
                size += flat
            else:
                stack.append(iter(value))
        else:
            size += 1
    if size > limit:
        raise _LimitError(f"a text of over {limit} characters")


_END_OF_ITEMS = object()


def _flat_size(values) -> int | None:
    """The text length of a flat list of strings (or at least of numbers), counted in C;
    None for anything else."""
    if not isinstance(values, list | tuple | set | frozenset):
        return None
    kinds = set(map(type, values))
    if kinds <= {str}:
        return sum(map(len, values))
    return len(values) if kinds <= {int, float, bool, type(None)} else None


def _check_format(spec, args: Iterable = ()) -> None:
    """The text `spec % args` or `spec.format(*args)` may build: its widths and precisions
    ('{:>999999999}', '%.999999f' * 100, widths from `*` arguments) and the arguments' text."""
    if not isinstance(spec, str):
        return
    numbers = regex.findall(r"\d+", spec)
    if any(len(n) > 7 for n in numbers):
        raise _LimitError("a format width passes the size limit")
    args = list(args)
    widths = sum(map(int, numbers)) + sum(
        abs(a) for a in args if isinstance(a, int) and not isinstance(a, bool)
    )
    _check_text(args, extra=len(spec) + widths)


def _format_args(right) -> list:
    """The values a `%` formatting takes: a tuple's items, a mapping's values, or one value."""
    if isinstance(right, tuple):
        return list(right)
    return list(right.values()) if isinstance(right, dict) else [right]


def _check_replace(text, old="", new="", *_) -> None:
    if isinstance(text, str) and isinstance(old, str) and isinstance(new, str):
        n = text.count(old) if old else len(text) + 1
        _check_length(len(text) + n * (len(new) - len(old)))


def _check_str_method(text: str, name: str, args: tuple, kwargs: dict) -> None:
    """What a str method called by the template will build, before it builds it."""
    if name == "replace":
        _check_replace(text, *args)
    elif name in ("format", "format_map"):
        _check_format(text, [*args, *kwargs.values()])
    elif name == "join" and args and isinstance(args[0], list | tuple):
        _check_text(args[0], extra=len(text) * len(args[0]))
    elif name == "expandtabs":
        width = args[0] if args else kwargs.get("tabsize", 8)
        if isinstance(width, int):
            _check_length(len(text) + text.count("\t") * max(width, 0))


class _LimitedSandbox(ImmutableSandboxedEnvironment):
    """Hugging Face's sandbox, with what any one operation may build bounded (see the top)."""

    intercepted_binops = frozenset({"*", "+", "**", "%"})

    def call_binop(self, context, operator, left, right):
        ints = isinstance(left, int) and isinstance(right, int)
        if operator == "**" and ints and abs(left) > 1 and right * abs(left).bit_length() > 4096:
            raise _LimitError(f"{left} ** {right} passes the size limit")
        if operator == "*":
            for n, seq in ((left, right), (right, left)):
                if isinstance(n, int) and isinstance(seq, str | list | tuple):
                    _check_length(n * len(seq), MAX_CHARS if isinstance(seq, str) else MAX_ITEMS)
        if operator == "+" and isinstance(left, str | list | tuple) and hasattr(right, "__len__"):
            _check_length(len(left) + len(right), MAX_CHARS if isinstance(left, str) else MAX_ITEMS)
        if operator == "%":
            _check_format(left, _format_args(right))
        return _check_size(super().call_binop(context, operator, left, right))

    def call(__self, __context, __obj, *args, **kwargs):  # noqa: N805 (jinja's signature)
        _check_sizes(args, kwargs)
        owner = getattr(__obj, "__self__", None)
        name = getattr(__obj, "__name__", "")
        if isinstance(owner, str) or name in ("format", "format_map"):
            # subtle: Jinja swaps str.format for its sandboxed formatter at attribute access,
            # so `format` arrives here without its string: `wrap_str_format` checks that one
            _check_str_method(owner if isinstance(owner, str) else "", name, args, kwargs)
        return _check_size(super().call(__context, __obj, *args, **kwargs))

    def wrap_str_format(self, value):
        wrapped = super().wrap_str_format(value)
        if wrapped is not None:
            _check_format(value.__self__)
        return wrapped


# Filters that never turn their value into text; every other one does (upper, trim, string,
# escape, pprint ...), so their value's text is checked first.
_STRUCTURAL_FILTERS = {
    "abs", "attr", "batch", "count", "d", "default", "dictsort", "first", "float", "groupby",
    "int", "items", "last", "length", "list", "map", "max", "min", "random", "reject",
    "rejectattr", "reverse", "round", "select", "selectattr", "slice", "sort", "sum", "tojson",
    "unique",
}  # fmt: skip


def _limited_filter(name: str, f):
    """Filter `f` with the size checks; its value comes after the context Jinja may pass."""
    first = 1 if getattr(f, "jinja_pass_arg", None) else 0

    @wraps(f)  # keeps `jinja_pass_arg`, which tells Jinja what to pass first
    def limited(*args, **kwargs):
        value, params = (args[first], args[first + 1 :]) if len(args) > first else (None, ())
        _check_sizes(params, kwargs)
        sized = hasattr(value, "__len__")
        if name not in _STRUCTURAL_FILTERS and name != "join":
            _check_text([value])
        if name == "format":
            _check_format(value, [*params, *kwargs.values()])
        elif name == "replace":
            _check_replace(str(value), *params)
        elif name == "indent":
            _check_indent(value, *params, **kwargs)
        elif name == "wordwrap":
            _check_wordwrap(value, *params, **kwargs)
        elif name in ("batch", "slice") and params and isinstance(params[0], int) and sized:
            # as many lists as they make, checked before each is made (1.3M batches of 3: 1 s)
            count = params[0] if name == "slice" else len(value) // max(params[0], 1)
            _check_length(count, MAX_ITEMS)
        elif name == "pprint":
            _check_text([value], limit=MAX_PPRINT_CHARS)
        elif name == "join":
            if not isinstance(value, str | list | tuple):  # a generator (`map`): read it once
                value = list(value)
            _check_joined(args[0], value, *params, **kwargs)
            args = (*args[:first], value, *params)
        return _check_size(f(*args, **kwargs))

    return limited


def _check_indent(text, width: int | str = 4, *_, **__) -> None:
    """`indent` puts `width` before every line: 4M lines x a width of 4M is 16T characters."""
    indent = len(width) if isinstance(width, str) else width if isinstance(width, int) else 0
    _check_length(len(str(text)) + indent * (len(str(text).splitlines()) + 1))


def _check_wordwrap(text, width=79, long_words=True, wrapstring=None, *_, **kwargs) -> None:
    """`wordwrap` puts `wrapstring` between lines: at most one line per character."""
    wrapstring = kwargs.get("wrapstring", wrapstring)
    if isinstance(wrapstring, str):
        _check_length(len(str(text)) * (1 + len(wrapstring)))


def _check_joined(eval_ctx, items, separator: str = "", attribute=None) -> None:
    """The text `join` builds: each item's (or its `attribute`'s) text, and the separators."""
    extra = len(str(separator)) * max(len(items) - 1, 0)
    if isinstance(items, str):  # its characters, joined
        _check_length(len(items) + extra)
        return
    if attribute is not None:
        items = map(make_attrgetter(eval_ctx.environment, attribute), items)
    _check_length(extra)
    _check_text(items, extra)


@pass_environment
def _sum(environment, iterable, attribute=None, start=0):
    """Jinja's `sum`; lists (or tuples) joined in one pass once their total is known to fit.

    subtle: sum(start=[]) copies the growing list at every step, in C: `([l] * 30)|sum(start=[])`
    took 13 s and 1.9 GB before any check could see the result.
    """
    if attribute is not None:
        iterable = map(make_attrgetter(environment, attribute), iterable)
    if not isinstance(start, list | tuple):
        return sum(iterable, start)
    kind = list if isinstance(start, list) else tuple
    items = list(iterable)
    if wrong := next((item for item in items if not isinstance(item, kind)), None):
        raise TypeError(f"sum: cannot add {type(wrong).__name__} to {kind.__name__}")
    _check_length(len(start) + sum(map(len, items)), MAX_ITEMS)
    return kind(chain(start, *items))


def _lipsum(n: int = 5, html: bool = True, min: int = 20, max: int = 100) -> str:  # noqa: A002
    """Jinja's `lipsum` global, bounded: n paragraphs of up to `max` words of up to 12 chars."""
    _check_length(n * max * 13)
    return generate_lorem_ipsum(n, html, min, max)


def _concat(values) -> str:
    """Jinja's `~`, with the result's size checked before it is built."""
    _check_text(values)
    return "".join([str(v) for v in values])


def _finalize(value):
    """Every `{{ value }}` goes through here before Jinja's str(): check the text it makes."""
    _check_text([value])
    return value


class _LimitedCodeGenerator(CodeGenerator):
    """Compiles `a ~ b` to a call of `_concat` (Jinja's own join checks nothing)."""

    def visit_Concat(self, node, frame) -> None:
        self.write("environment.concat((")
        for arg in node.nodes:
            self.visit(arg, frame)
            self.write(", ")
        self.write("))")


_LimitedSandbox.code_generator_class = _LimitedCodeGenerator
_LimitedSandbox.concat = staticmethod(_concat)


@lru_cache
def _compile(template: str) -> jinja2.Template:
    """The template in Hugging Face's environment: immutable sandbox, trim_blocks, lstrip_blocks,
    loop controls, and the helpers templates on the Hub call."""
    env = _LimitedSandbox(
        trim_blocks=True,
        lstrip_blocks=True,
        extensions=[jinja2.ext.loopcontrols],
        finalize=_finalize,
    )
    env.filters |= {"sum": _sum, "tojson": _tojson}
    env.filters = {name: _limited_filter(name, f) for name, f in env.filters.items()}
    env.globals["lipsum"] = _lipsum
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(template)


def _raise_exception(message: str):
    raise jinja2.TemplateError(message)


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:
    """JSON text of `value`, refused as soon as it passes MAX_CHARS.

    subtle: Jinja's own tojson escapes <, >, & and ' for HTML; chat templates want plain JSON,
    as json.dumps writes it. json.dumps builds the whole text in C first (2.3 GB for a big
    list); the encoder's `iterencode` yields it in pieces from Python, so the size is counted
    as it grows and the deadline can stop it.
    """
    encoder = json.JSONEncoder(
        ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )
    pieces, size = [], 0
    for piece in encoder.iterencode(value):
        size += len(piece)
        if size > MAX_CHARS:
            raise _LimitError(f"tojson passes {MAX_CHARS} characters")
        pieces.append(piece)
    return "".join(pieces)
