"""`tinyformers serve`: OpenAI's HTTP API (`app`) over a continuous-batching engine (`engine`)."""

from tinyformers.serve.app import Settings, create_app
from tinyformers.serve.engine import Engine, Request

__all__ = ["Engine", "Request", "Settings", "create_app"]
