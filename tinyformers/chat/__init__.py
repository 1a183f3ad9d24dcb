"""Chat: templates rendered as Hugging Face does, and a conversation that fits the context."""

from tinyformers.chat.conversation import Conversation
from tinyformers.chat.template import Message, encode_chat, render_chat

__all__ = ["Conversation", "Message", "encode_chat", "render_chat"]
