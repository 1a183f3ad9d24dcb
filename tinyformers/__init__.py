"""tinyformers: transformers from scratch on PyTorch.

Example:
    model = tinyformers.load("gpt2")
    model.generate("The meaning of life is", max_new_tokens=20)
"""

from tinyformers.errors import (
    CheckpointError,
    ContextLengthError,
    GGUFError,
    TinyformersError,
    TokenizerError,
)
from tinyformers.tokenizers import Tokenizer, load_tokenizer

__version__ = "0.1.0"
__all__ = [
    "CheckpointError",
    "ContextLengthError",
    "GGUFError",
    "LanguageModel",
    "TinyformersError",
    "Tokenizer",
    "TokenizerError",
    "load",
    "load_tokenizer",
]


def __getattr__(name: str):
    # The model API imports torch (seconds); tokenizing alone should not pay for it.
    if name in ("load", "LanguageModel"):
        from tinyformers import lm

        return getattr(lm, name)
    raise AttributeError(f"module 'tinyformers' has no attribute {name!r}")
