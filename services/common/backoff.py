"""Capped exponential backoff with jitter, for loops that retry on their own schedule."""

from __future__ import annotations

import random
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Backoff:
    """Wait before retry n (from 0): uniform in [c/2, c] with c = min(max_seconds, initial_seconds * 2**n)."""

    initial_seconds: float
    max_seconds: float

    def __post_init__(self) -> None:
        if not 0 < self.initial_seconds <= self.max_seconds:
            raise ValueError(f"backoff needs 0 < initial ({self.initial_seconds}) <= max ({self.max_seconds})")

    def delay(self, attempt: int) -> float:
        ceiling = min(self.max_seconds, self.initial_seconds * 2 ** min(attempt, 30))
        return random.uniform(ceiling / 2, ceiling)
