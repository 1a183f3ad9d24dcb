"""tinyformers: transformers from scratch on PyTorch."""

__version__ = "0.1.0"
