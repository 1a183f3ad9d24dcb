"""Sampling settings, apart from the tensor code so the CLI can parse flags without torch."""

from __future__ import annotations

import math
from dataclasses import dataclass

from tinyformers.errors import ParameterError

# The limits of a request, one source for the library, the command line and the server.
MAX_SEED = 2**64 - 1  # torch.Generator.manual_seed takes a 64-bit seed
MIN_PENALTY, MAX_PENALTY = 1e-6, 1e6  # past these a float32 logit over- or underflows
MAX_STOP = 16  # stop strings of one call (OpenAI's 4 is too few: HumanEval sends 5)


@dataclass(frozen=True)
class SamplingParams:
    """What `generate` samples with; a value out of range raises ParameterError (a ValueError)
    naming it, here rather than as a NaN or an overflow deep in the sampling code."""

    temperature: float = 0.8
    top_k: int = 40
    top_p: float = 0.95
    min_p: float = 0.05
    repetition_penalty: float = 1.0
    seed: int | None = None

    def __post_init__(self) -> None:
        if not (_real(self.temperature) and self.temperature >= 0):
            raise ParameterError(
                f"temperature must be a finite number >= 0 (0 is greedy), got {self.temperature!r}"
            )
        if not (_integer(self.top_k) and self.top_k >= 0):
            raise ParameterError(f"top_k must be an integer >= 0 (0 is off), got {self.top_k!r}")
        if not (_real(self.top_p) and 0 < self.top_p <= 1):
            raise ParameterError(f"top_p must be in (0, 1] (1 is off), got {self.top_p!r}")
        if not (_real(self.min_p) and 0 <= self.min_p < 1):
            raise ParameterError(f"min_p must be in [0, 1) (0 is off), got {self.min_p!r}")
        penalty = self.repetition_penalty
        if not (_real(penalty) and MIN_PENALTY <= penalty <= MAX_PENALTY):
            raise ParameterError(
                f"repetition_penalty must be in [{MIN_PENALTY:g}, {MAX_PENALTY:g}] (1 is off), "
                f"got {self.repetition_penalty!r}"
            )
        if self.seed is not None and not (_integer(self.seed) and 0 <= self.seed <= MAX_SEED):
            raise ParameterError(f"seed must be an integer in [0, 2**64 - 1], got {self.seed!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def _integer(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _real(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
