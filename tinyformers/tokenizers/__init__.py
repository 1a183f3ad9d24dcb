"""Tokenizers from GGUF, tokenizer.json or vocab.json: byte-level BPE (GPT-2, SmolLM2, Llama 3)
and SentencePiece-style BPE (Gemma, Llama 2)."""

from tinyformers.tokenizers.bpe import StreamDecoder, Tokenizer
from tinyformers.tokenizers.sentencepiece import SentencePieceTokenizer
from tinyformers.tokenizers.sources import from_gguf_metadata, load_tokenizer

__all__ = [
    "SentencePieceTokenizer",
    "StreamDecoder",
    "Tokenizer",
    "from_gguf_metadata",
    "load_tokenizer",
]
