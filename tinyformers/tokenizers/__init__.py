"""Tokenizers from GGUF, tokenizer.json or vocab.json: byte-level BPE (GPT-2, SmolLM2, Llama 3)
and SentencePiece-style BPE (Gemma, Llama 2); characters (nanoGPT's shakespeare_char); all
written back as Hugging Face files by `save_tokenizer`."""

from tinyformers.tokenizers.bpe import StreamDecoder, Tokenizer
from tinyformers.tokenizers.chars import CharTokenizer
from tinyformers.tokenizers.save import save_tokenizer
from tinyformers.tokenizers.sentencepiece import SentencePieceTokenizer
from tinyformers.tokenizers.sources import from_gguf_metadata, load_tokenizer


def prompt_ids(
    tokenizer: Tokenizer | SentencePieceTokenizer | CharTokenizer, text: str
) -> list[int]:
    """The ids a model reads for a plain-text prompt: BOS first where the tokenizer's own config
    asks for it (`add_bos_token`: Gemma, Llama 2; HF and llama.cpp do the same), and BOS alone
    for an empty prompt. `encode` itself never adds BOS: the chat template writes its own."""
    ids = tokenizer.encode(text)
    bos = tokenizer.bos_token_id
    if bos is not None and (tokenizer.add_bos_token or not ids) and ids[:1] != [bos]:
        ids = [bos, *ids]
    return ids


__all__ = [
    "CharTokenizer",
    "SentencePieceTokenizer",
    "StreamDecoder",
    "Tokenizer",
    "from_gguf_metadata",
    "load_tokenizer",
    "prompt_ids",
    "save_tokenizer",
]
