"""A conversation kept inside the context window: the oldest turns go first, the system never."""

from __future__ import annotations

from dataclasses import dataclass, field

from tinyformers.chat.template import Message, encode_chat
from tinyformers.errors import ContextLengthError


@dataclass
class Conversation:
    """The system message (None: the template's default) and the turns after it.

    `turns` alternates user, assistant, user, ...; it ends with a user message while an answer
    is being generated.

    Example:
        >>> chat = Conversation(system="Answer in French.")
        >>> chat.turns.append({"role": "user", "content": "Hello"})
        >>> ids, dropped = chat.fit(model.tokenizer, 8192, max_new_tokens=512)
    """

    system: str | None = None
    turns: list[Message] = field(default_factory=list)

    def messages(self, turns: list[Message] | None = None) -> list[Message]:
        head = [] if self.system is None else [{"role": "system", "content": self.system}]
        return head + (self.turns if turns is None else turns)

    def fit(self, tokenizer, context_length: int, max_new_tokens: int) -> tuple[list[int], int]:
        """The prompt ids for the next answer, and how many oldest user/assistant pairs were
        dropped from `turns` so that they fit with `max_new_tokens` in the context.

        Raises ContextLengthError, leaving the turns as they were, when even the system message
        and the last user message alone do not fit.
        """
        room = context_length - max_new_tokens
        for dropped in range(len(self.turns) // 2 + 1):
            ids = encode_chat(tokenizer, self.messages(self.turns[2 * dropped :]))
            if len(ids) <= room:
                del self.turns[: 2 * dropped]
                return ids, dropped
        raise ContextLengthError(
            f"this message takes {len(ids)} tokens with the chat template, and {max_new_tokens} "
            f"more are kept for the answer: that exceeds the {context_length}-token context "
            "(send a shorter message or pass a smaller --max-new-tokens)"
        )
