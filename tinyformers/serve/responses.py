"""OpenAI's response shapes, built from what the engine generated: one choice at a time for a
whole answer, one chunk at a time for a stream (server-sent events)."""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass, field

from tinyformers.serve.engine import TokenLogprob


@dataclass
class Choice:
    """What one choice has generated so far."""

    text: str = ""
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None
    completion_tokens: int = 0
    cached_tokens: int = 0
    tool_calls: list = field(default_factory=list)  # chat/tools.py's ToolCall, when tools were on


class Shapes:
    """The bodies of one answer: same id, time and model name in each; `chat` or completion."""

    def __init__(self, chat: bool, model: str, tokenizer) -> None:
        self.chat, self.model, self.tokenizer = chat, model, tokenizer
        self.id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        self.created = int(time.time())

    def _head(self, chunk: bool) -> dict:
        kind = "chat.completion" if self.chat else "text_completion"
        kind += ".chunk" if chunk and self.chat else ""
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model}

    def answer(
        self, choices: list[Choice], prompt_tokens: int, cached_tokens: int, logprobs: bool
    ) -> dict:
        """The whole answer, for a request without `stream`."""
        out = []
        for index, c in enumerate(choices):
            if self.chat:
                body = {"message": {"role": "assistant", "content": c.text}}
                if c.tool_calls:  # content null when the answer is only calls, as OpenAI's
                    calls = [call.openai() for call in c.tool_calls]
                    body["message"] |= {"content": c.text or None, "tool_calls": calls}
            else:
                body = {"text": c.text}
            body["logprobs"] = self.logprobs(c.logprobs) if logprobs else None
            out.append({"index": index, **body, "finish_reason": c.finish_reason})
        completion_tokens = sum(c.completion_tokens for c in choices)
        usage = self.usage(prompt_tokens, completion_tokens, cached_tokens)
        return {**self._head(chunk=False), "choices": out, "usage": usage}

    def chunk(
        self,
        index: int,
        text: str | None = None,
        role: bool = False,
        logprobs: list[TokenLogprob] | None = None,
        finish_reason: str | None = None,
        usage: bool = False,
        tool_calls: list | None = None,
    ) -> str:
        """One server-sent event of a stream for choice `index`."""
        if self.chat:
            delta = {"role": "assistant"} if role else {}
            if text is not None:
                delta["content"] = text
            if tool_calls:
                delta["tool_calls"] = [call.openai(streamed=True) for call in tool_calls]
            body = {"delta": delta}
        else:
            body = {"text": text or ""}
        body["logprobs"] = self.logprobs(logprobs) if logprobs else None
        choice = {"index": index, **body, "finish_reason": finish_reason}
        extra = {"usage": None} if usage else {}  # every chunk says "no usage yet" when asked
        return event({**self._head(chunk=True), "choices": [choice], **extra})

    def usage_chunk(self, prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> str:
        """The last event before [DONE] when `stream_options.include_usage` asked for it."""
        usage = self.usage(prompt_tokens, completion_tokens, cached_tokens)
        return event({**self._head(chunk=True), "choices": [], "usage": usage})

    @staticmethod
    def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> dict:
        """Token counts; `cached_tokens`: prompt tokens whose keys and values the prompt cache
        held (each prompt's first choice counted, as prompt_tokens counts each prompt once)."""
        return {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached_tokens},
        }

    def logprobs(self, entries: list[TokenLogprob]) -> dict:
        """Chat: {content: [{token, logprob, bytes, top_logprobs}]}; completions: parallel
        lists of tokens, their logprobs, the top alternatives and each text offset (an echoed
        prompt's first token has null for both, as in OpenAI's legacy API and vLLM)."""
        if self.chat:
            return {"content": [self._chat_entry(e) for e in entries], "refusal": None}
        return {
            "tokens": [self._text(e.token) for e in entries],
            "token_logprobs": [e.logprob for e in entries],
            "top_logprobs": [
                None if e.logprob is None else {self._text(t): lp for t, lp in e.top}
                for e in entries
            ],
            "text_offset": [e.text_offset for e in entries],
        }

    def _chat_entry(self, e: TokenLogprob) -> dict:
        top = [self._token(t, lp) for t, lp in e.top]
        return {**self._token(e.token, e.logprob), "top_logprobs": top}

    def _token(self, token: int, logprob: float) -> dict:
        raw = self.tokenizer.decode_bytes([token])
        return {"token": self._text(token), "logprob": logprob, "bytes": list(raw)}

    def _text(self, token: int) -> str:
        return self.tokenizer.id_to_text(token)  # part of a character shows as U+FFFD


def event(body: dict) -> str:
    """One server-sent event holding `body` as JSON."""
    return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"


DONE = "data: [DONE]\n\n"
