"""Tool calls: the tools a request offers, written into the prompt by the chat template, and the
calls the model writes, parsed back out of its text.

The format follows the template (`tool_format`):
- "hermes": one `<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>` block a call.
  Qwen2.5, Qwen3 and Hermes 2/3 templates write it.
- "llama3": a bare JSON object `{"name": ..., "parameters": {...}}`, maybe after
  `<|python_tag|>`, several joined by ";". Llama 3.1-3.3 templates ask for it.
- A template that renders no tools is polyfilled: SmolLM2-135M-Instruct's writes only each
  message's role and content, and Gemma 3's defines no tool format. The tools go into the system
  message in the words Qwen2.5's template uses, calls and results into the messages as Hermes'
  blocks, and the answer is parsed as "hermes". llama-server does the same for such templates.

A call that the request forces (`tool_choice` "required" or a named function) is decoded under
`call_grammar`: the family's markers around a JSON schema of the call, so it always parses.
"""

from __future__ import annotations

import json
import secrets
from dataclasses import dataclass, replace
from functools import lru_cache

from tinyformers.chat.template import render_chat
from tinyformers.errors import TemplateError
from tinyformers.generation.constrain import JSON_OPTIONS, Grammar, lark

HERMES_OPEN, HERMES_CLOSE = "<tool_call>", "</tool_call>"
PYTHON_TAG = "<|python_tag|>"  # Llama 3's opening of a tool call

# What Qwen2.5's template writes after the system message; a polyfilled template gets it too.
HERMES_TOOLS = (
    "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n"
    "{tools}\n</tools>\n\n"
    "For each function call, return a json object with function name and arguments within "
    "<tool_call></tool_call> XML tags:\n<tool_call>\n"
    '{{"name": <function-name>, "arguments": <args-json-object>}}\n</tool_call>'
)


@dataclass(frozen=True)
class ToolCall:
    """One call the model made: OpenAI's `{id, type: "function", function: {name, arguments}}`,
    `arguments` a JSON object as text; `index` its place among the answer's calls."""

    id: str
    name: str
    arguments: str
    index: int = 0

    def openai(self, streamed: bool = False) -> dict:
        """The call as OpenAI writes it (a streamed delta's starts with its index)."""
        call = {"index": self.index} if streamed else {}
        call |= {"id": self.id, "type": "function"}
        call["function"] = {"name": self.name, "arguments": self.arguments}
        return call


@dataclass(frozen=True)
class ToolFormat:
    """How a template's model calls tools: `name` "hermes" or "llama3"; `native` when the
    template writes the tools itself (else they are polyfilled, see the top)."""

    name: str
    native: bool

    @property
    def arguments_key(self) -> str:
        return "parameters" if self.name == "llama3" else "arguments"


@lru_cache(maxsize=64)
def tool_format(template: str) -> ToolFormat:
    """The tool-call format of a chat template, found by rendering a probe tool through it."""
    probe = {"type": "function", "function": {"name": "tinyformers_probe", "parameters": {}}}
    try:
        text = render_chat(template, [{"role": "user", "content": "x"}], tools=[probe])
    except TemplateError:
        text = ""
    native = "tinyformers_probe" in text
    llama3 = native and (PYTHON_TAG in template or "ipython" in template)
    return ToolFormat("llama3" if llama3 and HERMES_OPEN not in template else "hermes", native)


def template_messages(
    fmt: ToolFormat, messages: list[dict], tools: list[dict] | None
) -> tuple[list[dict], list[dict] | None]:
    """`messages` and `tools` as the template takes them (transformers' conventions).

    A call's arguments become a dict (OpenAI sends JSON text; templates write them with
    `tojson`), and a tool result gets its function's `name` from the call it answers. For a
    template without tools, everything is polyfilled into plain system, assistant and user
    messages.
    """
    names = {}
    out = []
    for m in messages:
        m = dict(m)
        if m.get("tool_calls"):
            m["tool_calls"] = [_template_call(c) for c in m["tool_calls"]]
            names.update((c["id"], c["function"]["name"]) for c in m["tool_calls"])
        if m["role"] == "tool" and m.get("tool_call_id") in names:
            m["name"] = names[m["tool_call_id"]]
        out.append(m)
    if fmt.native:
        return out, tools
    return _polyfill(out, tools), None


def _template_call(call: dict) -> dict:
    function = call["function"]
    arguments = function["arguments"]
    if isinstance(arguments, str):
        arguments = json.loads(arguments)  # checked to be an object when the request came in
    return {**call, "function": {**function, "arguments": arguments}}


def _polyfill(messages: list[dict], tools: list[dict] | None) -> list[dict]:
    """Tools into the system message, calls into the assistant's text, results into one user
    message per run of them: all as Hermes' blocks (see the top)."""
    out: list[dict] = []
    results = False  # the last message made is a run of tool results
    for m in messages:
        if m["role"] == "tool":
            block = f"<tool_response>\n{m.get('content') or ''}\n</tool_response>"
            if results:
                out[-1]["content"] += "\n" + block
            else:
                out.append({"role": "user", "content": block})
            results = True
            continue
        if m.get("tool_calls"):
            calls = [_hermes_block(c["function"]) for c in m["tool_calls"]]
            m = {"role": m["role"], "content": "\n".join([m.get("content") or "", *calls]).strip()}
        out.append(m)
        results = False
    if tools:
        listed = "\n".join(json.dumps(t, ensure_ascii=False) for t in tools)
        text = HERMES_TOOLS.format(tools=listed)
        if out and out[0]["role"] == "system":
            out[0] = {**out[0], "content": f"{out[0].get('content') or ''}\n\n{text}"}
        else:
            out.insert(0, {"role": "system", "content": text})
    return out


def _hermes_block(function: dict) -> str:
    call = {"name": function["name"], "arguments": function["arguments"]}
    return f"{HERMES_OPEN}\n{json.dumps(call, ensure_ascii=False)}\n{HERMES_CLOSE}"


# -- forced calls --------------------------------------------------------------------------------


def call_grammar(fmt: ToolFormat, tools: list[dict]) -> Grammar:
    """Exactly one call of one of `tools`, its arguments valid against the function's
    `parameters`, in the family's markers; then only EOS."""
    nl = "\n"
    rules = [
        f"call_{i}: %json {json.dumps(call_schema(fmt, tool), ensure_ascii=False)}"
        for i, tool in enumerate(tools)
    ]
    call = "(" + " | ".join(f"call_{i}" for i in range(len(tools))) + ")"
    if fmt.name == "hermes":  # Lark's strings take JSON's escapes
        call = f"{json.dumps(HERMES_OPEN + nl)} {call} {json.dumps(nl + HERMES_CLOSE)}"
    return lark("\n".join([f"start: {call}", *rules]))


def call_schema(fmt: ToolFormat, tool: dict) -> dict:
    """The JSON schema of one call of `tool`: {"name": its name, arguments: its parameters}."""
    function = tool["function"]
    # OpenAI: "omitting parameters defines a function with an empty parameter list"
    parameters = function.get("parameters") or {"type": "object", "additionalProperties": False}
    return {
        "x-guidance": JSON_OPTIONS,
        "type": "object",
        "properties": {
            "name": {"const": function["name"]},
            fmt.arguments_key: _moved_refs(parameters, f"/properties/{fmt.arguments_key}"),
        },
        "required": ["name", fmt.arguments_key],
        "additionalProperties": False,
    }


def _moved_refs(schema, prefix: str):
    """`schema` with its local `$ref`s ("#/$defs/x") pointing where it now sits inside the
    call's schema ("#/properties/arguments/$defs/x")."""
    if isinstance(schema, list):
        return [_moved_refs(s, prefix) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {}
    for key, value in schema.items():
        if key == "$ref" and isinstance(value, str) and value.startswith("#"):
            out[key] = "#" + prefix + value[1:]
        else:
            out[key] = _moved_refs(value, prefix)
    return out


# -- parsing the model's text --------------------------------------------------------------------


class CallParser:
    """Splits what the model writes into text for the user and tool calls, as it streams.

    `feed(text)` returns (content to send now, calls completed now); `finish()` the rest.
    Text that may open a call is held back until it is known not to; a block that does not
    parse is given back as text.

    Example:
        >>> p = CallParser(ToolFormat("hermes", True), {"f"})
        >>> p.feed('<tool_call>\\n{"name": "f", "arguments": {}}\\n</tool_call>')
        ('', [ToolCall(id='call_...', name='f', arguments='{}')])
    """

    def __init__(self, fmt: ToolFormat, names: set[str]) -> None:
        self.fmt, self.names = fmt, names
        self.held = ""  # text not yet given out
        self.in_call = False  # inside <tool_call> ... (hermes)
        self.called = 0  # calls given out
        self.holding = None  # llama3: None until the answer shows whether it is a call

    def feed(self, text: str) -> tuple[str, list[ToolCall]]:
        self.held += text
        if self.fmt.name == "llama3":
            return self._feed_llama3(), []
        content, calls = self._feed_hermes()
        return content, self._numbered(calls)

    def finish(self) -> tuple[str, list[ToolCall]]:
        held, self.held = self.held, ""
        if self.fmt.name == "llama3":
            calls = _json_calls(held, self.names) if self.holding else None
            return ("", self._numbered(calls)) if calls else (held, [])
        if self.in_call:  # the model ended right after the JSON, without the closing tag
            call = _hermes_call(held, self.names)
            return ("", self._numbered([call])) if call else (HERMES_OPEN + held, [])
        return ("" if self.called and not held.strip() else held), []

    def _numbered(self, calls: list[ToolCall]) -> list[ToolCall]:
        out = [replace(c, index=self.called + k) for k, c in enumerate(calls)]
        self.called += len(out)
        return out

    def _feed_hermes(self) -> tuple[str, list[ToolCall]]:
        content, calls = "", []
        while True:
            if self.in_call:
                end = self.held.find(HERMES_CLOSE)
                if end < 0:
                    return content, calls
                block, self.held = self.held[:end], self.held[end + len(HERMES_CLOSE) :]
                self.in_call = False
                call = _hermes_call(block, self.names)
                if call:
                    calls.append(call)
                else:
                    content += HERMES_OPEN + block + HERMES_CLOSE
                continue
            start = self.held.find(HERMES_OPEN)
            if start < 0:
                # subtle: "<tool" at the end may be the start of a call: keep it back
                cut = len(self.held) - _partial_suffix(self.held, HERMES_OPEN)
                before, self.held = self.held[:cut], self.held[cut:]
                if (self.called or calls) and not before.strip():  # between two calls
                    self.held = before + self.held
                    return content, calls
                return content + before, calls
            before = self.held[:start]
            self.held = self.held[start + len(HERMES_OPEN) :]
            self.in_call = True
            if not ((self.called or calls) and not before.strip()):
                content += before

    def _feed_llama3(self) -> str:
        if self.holding is None:
            head = self.held.lstrip()
            if not head or (len(head) < len(PYTHON_TAG) and PYTHON_TAG.startswith(head)):
                return ""  # not yet known
            self.holding = head.startswith(("{", PYTHON_TAG))
        if self.holding:
            return ""
        held, self.held = self.held, ""
        return held


def parse_calls(fmt: ToolFormat, text: str, names: set[str]) -> tuple[str | None, list[ToolCall]]:
    """The content (None when there is only calls) and the calls in a whole answer."""
    parser = CallParser(fmt, names)
    content, calls = parser.feed(text)
    rest, more = parser.finish()
    content += rest
    calls += more
    return (None if calls and not content.strip() else content), calls


def _partial_suffix(text: str, marker: str) -> int:
    """Length of the longest end of `text` that begins `marker`."""
    for n in range(min(len(text), len(marker) - 1), 0, -1):
        if marker.startswith(text[-n:]):
            return n
    return 0


def _hermes_call(block: str, names: set[str]) -> ToolCall | None:
    try:
        call = json.loads(block)
    except ValueError:
        return None
    return _call(call, names)


def _json_calls(text: str, names: set[str]) -> list[ToolCall] | None:
    """Llama 3's calls: JSON objects after an optional <|python_tag|>, joined by ";"."""
    text = text.strip().removeprefix(PYTHON_TAG)
    decoder, calls, at = json.JSONDecoder(), [], 0
    while True:
        while at < len(text) and text[at] in " \t\r\n;":
            at += 1
        if at == len(text):
            return calls or None
        try:
            value, at = decoder.raw_decode(text, at)
        except ValueError:
            return None
        call = _call(value, names)
        if call is None:
            return None
        calls.append(call)


def _call(value, names: set[str]) -> ToolCall | None:
    """A ToolCall from {"name", "arguments" or "parameters"}, if the name is an offered tool."""
    if not isinstance(value, dict) or value.get("name") not in names:
        return None
    arguments = value.get("arguments", value.get("parameters", {}))
    if isinstance(arguments, str):  # some models write the arguments as JSON text
        try:
            arguments = json.loads(arguments)
        except ValueError:
            return None
    if not isinstance(arguments, dict):
        return None
    text = json.dumps(arguments, ensure_ascii=False)
    return ToolCall(f"call_{secrets.token_hex(12)}", value["name"], text)
