"""The OpenAI request bodies we accept, checked field by field, and the errors they raise.

Unknown fields are ignored, as OpenAI's clients send new ones over time; fields OpenAI defines
that we do not implement (logit_bias, penalties, echo on chat, tools on completions) are
refused by name rather than silently dropped; fields.py checks tools and response_format.
Every problem is an `APIError` that becomes
`{"error": {"message", "type", "param", "code"}}`.
"""

from __future__ import annotations

import hmac
import json
from typing import Any

from fastapi import Request
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from tinyformers.generation.params import MAX_PENALTY, MAX_SEED, MAX_STOP, MIN_PENALTY
from tinyformers.serve import fields

MAX_LOGPROBS = 20  # alternatives per token, as vLLM's default and OpenAI's chat allow


class APIError(Exception):
    """An error for the client: HTTP status, OpenAI error type, the field at fault, a code."""

    def __init__(
        self,
        status: int,
        message: str,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.type = status, message, type
        self.param, self.code, self.headers = param, code, headers

    def body(self) -> dict:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    include_usage: bool = False


class _Body(BaseModel):
    # strict: "0.5" is not a number and 1 is not a boolean (an int is still a float)
    model_config = ConfigDict(extra="ignore", strict=True)

    model: str | None = None  # any name: the served model answers
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    seed: int | None = Field(None, ge=0, le=MAX_SEED)
    stop: Any = Field(None, validate_default=True)
    n: int = Field(1, ge=1, le=16)
    stream: bool = False
    stream_options: StreamOptions | None = None
    # extensions, as in vLLM and llama.cpp's server
    top_k: int | None = Field(None, ge=0)
    min_p: float | None = Field(None, ge=0, lt=1)
    repetition_penalty: float | None = Field(None, ge=MIN_PENALTY, le=MAX_PENALTY)

    @field_validator("stop")
    @classmethod
    def _stop(cls, value) -> list[str]:
        stops = [value] if isinstance(value, str) else value
        if value is None:
            return []
        if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
            raise ValueError(f"expected a string or a list of up to {MAX_STOP} strings")
        if len(stops) > MAX_STOP:
            raise ValueError(f"at most {MAX_STOP} stop strings, got {len(stops)}")
        return [s for s in stops if s]


class ChatRequest(_Body):
    messages: list[Any] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    tools: Any = None
    tool_choice: Any = None
    parallel_tool_calls: bool = True  # a forced call is always one
    response_format: Any = None

    @field_validator("messages")
    @classmethod
    def _messages(cls, messages: list) -> list[dict]:
        return [_message(i, m) for i, m in enumerate(messages)]

    @field_validator("tools")
    @classmethod
    def _tools(cls, tools) -> list[dict] | None:
        return fields.check_tools(tools)

    @field_validator("tool_choice")
    @classmethod
    def _tool_choice(cls, choice) -> str | dict | None:
        return fields.check_tool_choice(choice)

    @field_validator("response_format")
    @classmethod
    def _response_format(cls, value) -> dict | None:
        return fields.check_response_format(value)


class CompletionRequest(_Body):
    prompt: Any
    max_tokens: int | None = Field(None, ge=0)  # 0 with echo: score the prompt alone
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    echo: bool = False  # the prompt first, and its tokens' logprobs with `logprobs`
    response_format: Any = None

    @field_validator("response_format")
    @classmethod
    def _response_format(cls, value) -> dict | None:
        return fields.check_response_format(value)

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, prompt) -> list[str | list[int]]:
        """A string, a list of strings, a list of token ids, or a list of lists of ids."""
        if isinstance(prompt, str) or _ids(prompt):
            return [prompt]
        if (
            isinstance(prompt, list)
            and prompt
            and all(isinstance(p, str) or _ids(p) for p in prompt)
        ):
            return prompt
        raise ValueError(
            "expected a string, a list of strings, a list of token ids or a list of such lists"
        )


def _ids(value) -> bool:
    """A non-empty list of token ids."""
    return (
        isinstance(value, list)
        and bool(value)
        and all(isinstance(i, int) and not isinstance(i, bool) for i in value)
    )


ROLES = {
    "system": "system",
    "developer": "system",
    "user": "user",
    "assistant": "assistant",
    "tool": "tool",  # a tool's result, answering an assistant's call
}


def _message(i: int, message) -> dict:
    """{"role", "content"} with content as one string (text parts joined by newlines); a tool
    result and an assistant's tool calls as fields.check_tool_message gives them."""
    if not isinstance(message, dict):
        raise ValueError(f"[{i}] expected an object with role and content")
    role, content = message.get("role"), message.get("content")
    if role not in ROLES:
        roles = ", ".join(ROLES)
        raise ValueError(f"[{i}].role expected one of {roles}, got {str(role)[:40]!r}")
    if message.get("function_call"):
        raise ValueError(f"[{i}].function_call is not supported: use tool_calls")
    if isinstance(content, list):
        for j, part in enumerate(content):
            ok = isinstance(part, dict) and part.get("type") == "text"
            if not (ok and isinstance(part.get("text"), str)):
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise ValueError(
                    f"[{i}].content[{j}] expected a text part {{type: text, text: ...}}, "
                    f"got {str(kind)[:40]!r}"
                )
        content = "\n".join(part["text"] for part in content)
    if role == "tool" or message.get("tool_calls"):
        text = content if isinstance(content, str) else None
        return fields.check_tool_message(i, ROLES[role], message, text)
    if not isinstance(content, str):
        raise ValueError(f"[{i}].content expected a string or a list of text parts")
    return {"role": ROLES[role], "content": content}


# Known OpenAI fields we do not implement: refused when set to anything but their default.
UNSUPPORTED = {
    "tools": lambda v: v not in (None, []),  # a chat field: completions refuse it
    "tool_choice": lambda v: v not in (None, "none"),  # a chat field too
    "functions": lambda v: v not in (None, []),
    "function_call": lambda v: v not in (None, "none"),
    "logit_bias": lambda v: v not in (None, {}),
    "frequency_penalty": lambda v: v not in (None, 0),
    "presence_penalty": lambda v: v not in (None, 0),
    "audio": lambda v: v is not None,
    "modalities": lambda v: v not in (None, ["text"]),
    "prediction": lambda v: v is not None,
    "web_search_options": lambda v: v is not None,
    "echo": lambda v: v not in (None, False),  # a completions field: chat refuses it
    "suffix": lambda v: v not in (None, ""),
    "best_of": lambda v: v not in (None, 1),
}


def parse(model: type[_Body], body: Any) -> _Body:
    """The request `body` (parsed JSON) as `model`, or an APIError naming the field."""
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object")
    for name, refused in UNSUPPORTED.items():
        if name in body and name not in model.model_fields and refused(body[name]):
            where = "chat completions" if name in CompletionRequest.model_fields else "this server"
            where = "completions" if name in ChatRequest.model_fields else where
            raise APIError(400, f"{name} is not supported by {where}", param=name)
    try:
        request = model.model_validate(body)
    except ValidationError as e:
        error = e.errors()[0]
        param = _param(error["loc"])
        message = error["msg"].removeprefix("Value error, ")
        if message.startswith(("[", ".")):  # a message that names its own place in the field
            param, _, message = (param + message).partition(" ")
        raise APIError(400, f"{param}: {message}", param=param) from None
    if isinstance(request, ChatRequest) and request.top_logprobs and not request.logprobs:
        raise APIError(400, "top_logprobs: needs logprobs set to true", param="top_logprobs")
    if isinstance(request, CompletionRequest) and request.max_tokens == 0 and not request.echo:
        raise APIError(
            400, "max_tokens: 0 needs echo set to true (to score the prompt)", param="max_tokens"
        )
    return request


def _param(loc: tuple) -> str:
    """A pydantic location as OpenAI writes a field: messages[0].content."""
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else f".{part}"
    return out.lstrip(".")


MAX_BODY = 8 * 2**20  # bytes of one request body


async def read_json(request: Request):
    """The body as JSON, whatever Content-Type says (curl -d sends a form type)."""
    size, chunks = 0, []
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_BODY:
            raise APIError(413, f"the request body is over {MAX_BODY} bytes")
        chunks.append(chunk)
    try:
        return json.loads(b"".join(chunks))
    except (ValueError, RecursionError) as e:
        raise APIError(400, f"the request body is not valid JSON: {e}"[:300]) from None


def check_api_key(request: Request, key: str | None) -> None:
    """Raise a 401 unless the request carries `Authorization: Bearer KEY` (no key: any may)."""
    if key is None:
        return
    given = request.headers.get("authorization", "")
    if not hmac.compare_digest(given.encode(), f"Bearer {key}".encode()):
        raise APIError(
            401,
            "missing or wrong API key (Authorization: Bearer KEY)",
            "authentication_error",
            code="invalid_api_key",
        )
