"""Errors a user can act on. The CLI prints them as one line and exits 1."""


class TinyformersError(Exception):
    """Base class: bad input from outside (a file, a config, a prompt), never a bug."""


class CheckpointError(TinyformersError):
    """A checkpoint folder or file that is missing, malformed, or does not fit the model."""


class GGUFError(CheckpointError):
    """A GGUF file that breaks the format or this reader's limits."""


class TokenizerError(TinyformersError):
    """A tokenizer file that cannot be read or does not describe a byte-level BPE."""


class TemplateError(TinyformersError):
    """A chat template that fails to render, or goes past the time, size or depth limits."""


class ContextLengthError(TinyformersError):
    """A prompt (plus the tokens asked for) longer than the model's context window."""


class ParameterError(TinyformersError, ValueError):
    """A generation setting out of its range (a ValueError too, as Python callers expect)."""


class DataError(TinyformersError):
    """Training data that cannot be read, is too short, or holds a record of the wrong shape."""
