"""Chat templates: the Jinja program a model ships to turn messages into its prompt text.

Rendered the way Hugging Face's `apply_chat_template` does (same sandbox, options and helpers),
so a template written for transformers gives the same text here; then encoded so that only the
control tokens the template itself writes become control tokens.

A template is a program from a stranger. Jinja's sandbox stops it reaching Python's internals;
`_LimitedSandbox` also bounds what it may cost: rendering stops after `MAX_SECONDS` (checked
on every template line and Python call), strings and lists built by `*`, `+`, `~`, `**` and
size arguments (`center(10**9)`, `replace`) stay under `MAX_CHARS`, and so does the output.
Every failure, whatever Python raised inside, is one TemplateError naming the model.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from functools import lru_cache, wraps

import jinja2
import jinja2.ext
import regex
from jinja2.compiler import CodeGenerator
from jinja2.sandbox import ImmutableSandboxedEnvironment

from tinyformers.errors import TemplateError, TinyformersError

MAX_SECONDS = 0.5  # real templates render in about a millisecond
MAX_CHARS = 4 * 2**20  # of any one string or list the template builds, and of the output
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
    control = _control_pattern(frozenset(tokenizer.special_tokens))
    text = render_chat(
        tokenizer.chat_template,
        _mark(messages, control),
        add_generation_prompt=add_generation_prompt,
        bos_token=tokenizer.bos_token,
        eos_token=tokenizer.eos_token,
        tools=None if tools is None else _mark(tools, control),
        source=tokenizer.source,
    )
    # re.split with one group gives [text, marked token, text, ...]; a marker the template cut
    # off its token gives None there. Both kinds still split the text, as Hugging Face does.
    pieces = _marked_pattern(control).split(text)
    ids: list[int] = []
    for i, piece in enumerate(pieces):
        if piece:
            ids += tokenizer.encode(piece, allowed_special=frozenset() if i % 2 else "all")
    return ids


def _mark(value, control: regex.Pattern):
    """Wrap each control token in the strings of `value` with the markers (dropping forged
    ones), inside lists and dicts too: a tool's schema or a call's arguments are the user's."""
    if isinstance(value, list):
        return [_mark(v, control) for v in value]
    if isinstance(value, dict):
        return {_mark(k, control): _mark(v, control) for k, v in value.items()}
    if not isinstance(value, str):
        return value
    value = value.replace(_START, "").replace(_END, "")
    return control.sub(lambda m: _START + m.group() + _END, value)


@lru_cache
def _control_pattern(tokens: frozenset[str]) -> regex.Pattern:
    longest_first = sorted(tokens, key=len, reverse=True)  # "<|im_start|>" before a prefix of it
    return regex.compile("|".join(map(regex.escape, longest_first)) or "(?!)")


@lru_cache
def _marked_pattern(control: regex.Pattern) -> regex.Pattern:
    return regex.compile(f"{_START}({control.pattern}){_END}|[{_START}{_END}]")


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


def _check_length(n: int) -> None:
    if n > MAX_CHARS:
        raise _LimitError(f"a value of {n} items passes the {MAX_CHARS} limit")


def _check_size(value):
    """`value` if it is not a string or list over MAX_CHARS."""
    if isinstance(value, str | list | tuple | bytes):
        _check_length(len(value))
    return value


def _check_sizes(args, kwargs) -> None:
    """No size argument (a width, a count) over MAX_CHARS: 'x'.center(10**9) takes a GB."""
    for v in (*args, *kwargs.values()):
        if isinstance(v, int) and not -MAX_CHARS <= v <= MAX_CHARS:
            raise _LimitError(f"argument {v} passes the {MAX_CHARS} size limit")


def _check_format(spec) -> None:
    """No width of 7 digits or more in a format string ('{:>999999999}', '%999999999d')."""
    if isinstance(spec, str) and regex.search(r"\d{7}", spec):
        raise _LimitError("a format width passes the size limit")


def _check_replace(text, old="", new="", *_) -> None:
    if isinstance(text, str) and isinstance(old, str) and isinstance(new, str):
        n = text.count(old) if old else len(text) + 1
        _check_length(len(text) + n * (len(new) - len(old)))


class _LimitedSandbox(ImmutableSandboxedEnvironment):
    """Hugging Face's sandbox, with what any one operation may build bounded (see the top)."""

    intercepted_binops = frozenset({"*", "+", "**"})

    def call_binop(self, context, operator, left, right):
        ints = isinstance(left, int) and isinstance(right, int)
        if operator == "**" and ints and abs(left) > 1 and right * abs(left).bit_length() > 4096:
            raise _LimitError(f"{left} ** {right} passes the size limit")
        if operator == "*":
            for n, seq in ((left, right), (right, left)):
                if isinstance(n, int) and isinstance(seq, str | list | tuple):
                    _check_length(n * len(seq))
        if operator == "+" and isinstance(left, str | list | tuple) and hasattr(right, "__len__"):
            _check_length(len(left) + len(right))
        return super().call_binop(context, operator, left, right)

    def call(__self, __context, __obj, *args, **kwargs):  # noqa: N805 (jinja's signature)
        _check_sizes(args, kwargs)
        if getattr(__obj, "__name__", "") == "replace":
            _check_replace(getattr(__obj, "__self__", None), *args)
        return _check_size(super().call(__context, __obj, *args, **kwargs))

    def wrap_str_format(self, value):
        # subtle: Jinja swaps str.format for its sandboxed formatter at attribute access,
        # so the format string is checked here, not in `call`
        wrapped = super().wrap_str_format(value)
        if wrapped is not None:
            _check_format(value.__self__)
        return wrapped


def _limited_filter(f):
    """Filter `f` with the size checks; its value comes after the context Jinja may pass."""
    first = 1 if getattr(f, "jinja_pass_arg", None) else 0

    @wraps(f)  # keeps `jinja_pass_arg`, which tells Jinja what to pass first
    def limited(*args, **kwargs):
        value, params = (args[first], args[first + 1 :]) if len(args) > first else (None, ())
        _check_sizes(params, kwargs)
        if f.__name__ == "do_format":
            _check_format(value)
        elif f.__name__ == "do_replace":
            _check_replace(str(value), *params)
        return _check_size(f(*args, **kwargs))

    return limited


def _concat(values) -> str:
    """Jinja's `~`, with the result's size checked before it is built."""
    parts = [str(v) for v in values]
    _check_length(sum(map(len, parts)))
    return "".join(parts)


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
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols]
    )
    env.filters = {name: _limited_filter(f) for name, f in env.filters.items()}
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(template)


def _raise_exception(message: str):
    raise jinja2.TemplateError(message)


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:
    # subtle: Jinja's own tojson escapes <, >, & and ' for HTML; chat templates want plain JSON.
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )
