"""Tools and structured output on the server: the messages and tools the chat template gets,
the grammar a request decodes under, and each answer's text split into tool calls as it
streams (fields.py checks the request's fields first).

- `tools` with `tool_choice` "auto" (the default when tools are given): the template shows the
  tools and the model may call one; its text is parsed (chat/tools.py).
- "required" or `{"type": "function", "function": {"name": ...}}`: exactly one call, decoded
  under its grammar, so it always parses.
- "none": no tools in the prompt and nothing parsed.
- `response_format` json_object or json_schema: the answer is decoded under the schema's
  grammar (generation/constrain.py). A forced call and a response format cannot both hold.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass

from tinyformers.chat.tools import (
    CallParser,
    ToolCall,
    ToolFormat,
    call_grammar,
    template_messages,
    tool_format,
)
from tinyformers.generation import constrain
from tinyformers.serve.engine import Delta, Finished
from tinyformers.serve.protocol import APIError


def prompt_chars(messages: list[dict], tools: list[dict] | None) -> int:
    """Characters the template gets from the request: what bounds its tokens."""
    text = sum(len(m.get("content") or "") for m in messages)
    calls = sum(len(json.dumps(m["tool_calls"])) for m in messages if m.get("tool_calls"))
    return text + calls + (len(json.dumps(tools)) if tools else 0)


# -- a request's plan ------------------------------------------------------------------------


@dataclass
class Plan:
    """How a chat request is rendered, decoded and parsed."""

    messages: list[dict]  # for the template
    tools: list[dict] | None  # for the template (None: it renders none)
    grammar: constrain.Grammar | None  # the answer's grammar, None: free text
    parse: ToolFormat | None  # parse tool calls out of the answer in this format
    names: set[str]  # the functions the answer may call


def plan(body, tokenizer) -> Plan:
    """The Plan of a chat request (fields already checked); APIError for a choice that names
    no tool, or a forced call together with a response format."""
    tools = body.tools or []
    choice = body.tool_choice or ("auto" if tools else "none")
    if choice != "none" and not tools:
        raise APIError(400, "tool_choice: needs tools", param="tool_choice")
    offered = tools if choice != "none" else []
    if isinstance(choice, dict):
        name = choice["function"]["name"]
        offered = [t for t in tools if t["function"]["name"] == name]
        if not offered:
            raise APIError(400, f"tool_choice: no tool is named {name!r}", param="tool_choice")
    forced = choice == "required" or isinstance(choice, dict)
    if forced and body.response_format:
        raise APIError(
            400,
            "tool_choice: a forced call and response_format cannot both shape the answer",
            param="tool_choice",
        )
    if tokenizer.chat_template is None:  # refused when the prompt is made
        return Plan(body.messages, None, None, None, set())
    fmt = tool_format(tokenizer.chat_template)
    messages, shown = template_messages(fmt, body.messages, tools if offered else None)
    grammar = call_grammar(fmt, offered) if forced else response_grammar(body.response_format)
    names = {t["function"]["name"] for t in offered}
    return Plan(messages, shown, grammar, fmt if names else None, names)


def response_grammar(response_format: dict | None) -> constrain.Grammar | None:
    """The grammar of a checked `response_format` (None for text)."""
    if response_format is None:
        return None
    if response_format["type"] == "json_object":
        return constrain.json_object()
    return constrain.json_schema(response_format["json_schema"].get("schema", {}))


def constrain_jobs(body, grammar: constrain.Grammar, model, jobs: list) -> None:
    """Give each job its own matcher of `grammar`; APIError (400, one line naming the keyword
    and where it is) unless the engine can enforce it. Slow the first time (the vocabulary is
    read): run it in a thread."""
    args = (model.tokenizer, model.config.vocab_size, model.eos_ids)
    try:
        constrain.check(grammar, *args)
    except constrain.GrammarError as e:
        raise _refusal(body, e, args) from None
    for job in jobs:
        job.constraint = constrain.Matcher(grammar, *args)


def _refusal(body, error: constrain.GrammarError, args) -> APIError:
    """The 400 for a grammar the engine refused, naming the field it came from."""
    if getattr(body, "response_format", None):
        where = "response_format"
        if body.response_format["type"] == "json_schema":
            where += ".json_schema.schema"
        return APIError(400, f"{where}: {error}", param="response_format")
    fmt = tool_format(args[0].chat_template)
    named = body.tool_choice["function"]["name"] if isinstance(body.tool_choice, dict) else None
    for i, tool in enumerate(body.tools or []):
        if named not in (None, tool["function"]["name"]):
            continue
        try:
            constrain.check(call_grammar(fmt, [tool]), *args)
        except constrain.GrammarError as e:
            where = f"tools[{i}].function.parameters"
            return APIError(400, f"{where}: {e}", param=where)
    return APIError(400, f"tools: {error}", param="tools")


# -- the answer ----------------------------------------------------------------------------


@dataclass
class CallDelta(Delta):
    """A Delta whose text is the user's part; `tool_calls` completed since the last one."""

    tool_calls: list[ToolCall] = dataclasses.field(default_factory=list)


async def parsed(results: AsyncIterator, fmt: ToolFormat, names: set[str], n: int):
    """`results` ((choice, event) pairs) with each choice's text split into text and tool
    calls (CallDelta), and "tool_calls" as the finish reason of a choice that made one."""
    parsers = [CallParser(fmt, names) for _ in range(n)]
    calls = [0] * n
    async for index, ev in results:
        if isinstance(ev, Delta):
            text, made = parsers[index].feed(ev.text)
            calls[index] += len(made)
            if text or made or ev.logprobs:  # held back whole: nothing to send yet
                yield index, CallDelta(text, ev.logprobs, made)
        elif isinstance(ev, Finished):
            text, made = parsers[index].finish()
            calls[index] += len(made)
            if text or made:
                yield index, CallDelta(text, [], made)
            if calls[index] and ev.reason == "stop":
                ev = dataclasses.replace(ev, reason="tool_calls")
            yield index, ev
        else:
            yield index, ev
