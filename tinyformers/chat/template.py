"""Chat templates: the Jinja program a model ships to turn messages into its prompt text.

Rendered the way Hugging Face's `apply_chat_template` does (same sandbox, options and helpers),
so a template written for transformers gives the same text here; then encoded so that only the
control tokens the template itself writes become control tokens.
"""

from __future__ import annotations

import json
from datetime import datetime
from functools import lru_cache

import jinja2
import jinja2.ext
import regex
from jinja2.sandbox import ImmutableSandboxedEnvironment

from tinyformers.errors import TinyformersError

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
    source: str = "chat template",
) -> str:
    """The prompt text `template` makes of `messages`, as `apply_chat_template(tokenize=False)`.

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
    try:
        return _compile(template).render(
            messages=messages,
            tools=None,  # passed even when unused: templates test `tools is not none`
            documents=None,
            add_generation_prompt=add_generation_prompt,
            **tokens,
        )
    except jinja2.TemplateError as e:  # raise_exception, a syntax error, a sandbox violation
        where = f" (line {e.lineno})" if getattr(e, "lineno", None) else ""
        message = " ".join(str(e).split())  # one line, whatever the template wrote
        raise TinyformersError(f"{source}: chat template error{where}: {message}") from e


def encode_chat(
    tokenizer, messages: list[Message], *, add_generation_prompt: bool = True
) -> list[int]:
    """The token ids of `messages` rendered with the tokenizer's chat template.

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
    marked = [{k: _mark(v, control) for k, v in m.items()} for m in messages]
    text = render_chat(
        tokenizer.chat_template,
        marked,
        add_generation_prompt=add_generation_prompt,
        bos_token=tokenizer.bos_token,
        eos_token=tokenizer.eos_token,
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
    """Wrap each control token in a message string with the markers (dropping forged ones)."""
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


@lru_cache
def _compile(template: str) -> jinja2.Template:
    """The template in Hugging Face's environment: immutable sandbox, trim_blocks, lstrip_blocks,
    loop controls, and the helpers templates on the Hub call."""
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols]
    )
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
