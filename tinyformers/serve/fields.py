"""The fields tools and structured output add to OpenAI's chat and completion bodies, checked
as `protocol` checks the others: a ValueError whose message starts with the place at fault
("[0].function.name ...") becomes a 400 naming it.
"""

from __future__ import annotations

import json
import re

NAME = re.compile(r"[a-zA-Z0-9_-]{1,64}")  # OpenAI's rule for function and schema names
MAX_TOOLS = 128  # as OpenAI


def check_tools(tools) -> list[dict] | None:
    """`tools`: a list of {"type": "function", "function": {name, description, parameters,
    strict}}; the entries as the template gets them."""
    if tools is None or tools == []:
        return None
    if not isinstance(tools, list) or len(tools) > MAX_TOOLS:
        raise ValueError(f"expected a list of up to {MAX_TOOLS} tools")
    seen = set()
    for i, tool in enumerate(tools):
        if not isinstance(tool, dict) or tool.get("type") != "function":
            raise ValueError(f'[{i}].type expected "function"')
        function = tool.get("function")
        if not isinstance(function, dict):
            raise ValueError(f"[{i}].function expected an object")
        name = function.get("name")
        if not (isinstance(name, str) and NAME.fullmatch(name)):
            raise ValueError(f"[{i}].function.name expected 1-64 of a-z, A-Z, 0-9, _ and -")
        if name in seen:
            raise ValueError(f"[{i}].function.name {name!r} is given twice")
        seen.add(name)
        parameters = function.get("parameters")
        if parameters is not None and not isinstance(parameters, dict):
            raise ValueError(f"[{i}].function.parameters expected a JSON schema object")
    return tools


def check_tool_choice(choice) -> str | dict | None:
    """ "auto", "none", "required" or {"type": "function", "function": {"name": ...}}."""
    if choice is None or choice in ("auto", "none", "required"):
        return choice
    named = isinstance(choice, dict) and choice.get("type") == "function"
    function = choice.get("function") if named else None
    if not (isinstance(function, dict) and isinstance(function.get("name"), str)):
        raise ValueError(
            'expected "auto", "none", "required" or {"type": "function", "function": {"name": ...}}'
        )
    return choice


def check_response_format(value) -> dict | None:
    """{"type": "text"}, {"type": "json_object"} or {"type": "json_schema", "json_schema":
    {"name", "schema", "strict", "description"}}; None for text."""
    kind = value.get("type") if isinstance(value, dict) else None
    if value is None or kind == "text":
        return None
    if kind == "json_object":
        return value
    if kind != "json_schema":
        raise ValueError('.type expected "text", "json_object" or "json_schema"')
    spec = value.get("json_schema")
    if not isinstance(spec, dict):
        raise ValueError(".json_schema expected an object with name and schema")
    if not (isinstance(spec.get("name"), str) and NAME.fullmatch(spec["name"])):
        raise ValueError(".json_schema.name expected 1-64 of a-z, A-Z, 0-9, _ and -")
    if not isinstance(spec.get("schema", {}), dict | bool):
        raise ValueError(".json_schema.schema expected a JSON schema object")
    return value


def check_tool_message(i: int, role: str, message: dict, content: str | None) -> dict:
    """A `tool` message ({tool_call_id, content}) or an assistant's with `tool_calls`, as
    the template gets it; `content` is the message's text, parts joined."""
    if role == "tool":
        if not isinstance(message.get("tool_call_id"), str):
            raise ValueError(f"[{i}].tool_call_id expected the id of the call this answers")
        if content is None:
            raise ValueError(f"[{i}].content expected a string or a list of text parts")
        return {"role": "tool", "tool_call_id": message["tool_call_id"], "content": content}
    calls = message["tool_calls"]
    if role != "assistant":
        raise ValueError(f"[{i}].tool_calls only an assistant message makes them")
    if not isinstance(calls, list):
        raise ValueError(f"[{i}].tool_calls expected a list")
    out = []
    for j, call in enumerate(calls):
        where = f"[{i}].tool_calls[{j}]"
        function = call.get("function") if isinstance(call, dict) else None
        if not (isinstance(function, dict) and isinstance(function.get("name"), str)):
            raise ValueError(f"{where}.function expected {{name, arguments}}")
        try:
            arguments = json.loads(function.get("arguments") or "{}")
        except (TypeError, ValueError):
            arguments = None
        if not isinstance(arguments, dict):
            raise ValueError(f"{where}.function.arguments expected a JSON object as a string")
        call_id = call.get("id") if isinstance(call.get("id"), str) else f"call_{i}_{j}"
        function = {"name": function["name"], "arguments": function["arguments"] or "{}"}
        out.append({"id": call_id, "type": "function", "function": function})
    return {"role": "assistant", "content": content or None, "tool_calls": out}
