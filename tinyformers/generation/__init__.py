from tinyformers.generation.generate import (
    GenerationStats,
    fit_context,
    generate_tokens,
    stream_text,
)
from tinyformers.generation.sampling import SamplingParams, next_tokens

__all__ = [
    "GenerationStats",
    "SamplingParams",
    "fit_context",
    "generate_tokens",
    "next_tokens",
    "stream_text",
]
