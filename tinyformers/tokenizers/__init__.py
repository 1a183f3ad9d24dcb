"""Byte-level BPE tokenizers (GPT-2, SmolLM2, Llama 3) from GGUF, tokenizer.json or vocab.json."""

from tinyformers.tokenizers.bpe import StreamDecoder, Tokenizer
from tinyformers.tokenizers.sources import from_gguf_metadata, load_tokenizer

__all__ = ["StreamDecoder", "Tokenizer", "from_gguf_metadata", "load_tokenizer"]
