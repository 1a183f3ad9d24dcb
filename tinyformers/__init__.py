"""tinyformers: transformers from scratch on PyTorch."""

from tinyformers.errors import (
    CheckpointError,
    ContextLengthError,
    GGUFError,
    TinyformersError,
    TokenizerError,
)
from tinyformers.lm import LanguageModel, load

__version__ = "0.1.0"
__all__ = [
    "CheckpointError",
    "ContextLengthError",
    "GGUFError",
    "LanguageModel",
    "TinyformersError",
    "TokenizerError",
    "load",
]
