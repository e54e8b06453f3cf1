"""Wall-clock budget of one run, checked between steps."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Protocol


class BudgetExhausted(Exception):
    """Raised when a step cannot start or finish inside the run's remaining budget."""


class Deadline:
    """A monotonic deadline. ``clock`` is injectable so tests can drive time."""

    def __init__(self, seconds: float, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self.total = seconds
        self._end = clock() + seconds

    def remaining(self) -> float:
        """Seconds left, never negative."""
        return max(0.0, self._end - self._clock())

    def expired(self, reserve: float = 0.0) -> bool:
        """True when fewer than ``reserve`` seconds are left."""
        return self.remaining() <= reserve

    def reserve(self, seconds: float, share: float = 0.25) -> float:
        """A safety margin of ``seconds``, but at most ``share`` of the whole budget (small budgets still work)."""
        return min(seconds, self.total * share)

    def check(self, reserve: float = 0.0) -> None:
        """Raise :class:`BudgetExhausted` when fewer than ``reserve`` seconds are left."""
        if self.expired(reserve):
            raise BudgetExhausted("time budget spent")

    @classmethod
    def unlimited(cls) -> Deadline:
        return cls(10.0**9)


class Limiter(Protocol):
    """A rate cap: ``acquire`` blocks until one more call fits, or raises :class:`BudgetExhausted` when the wait
    would pass ``deadline`` (a per-process :class:`~sync.http.RateLimiter` or an app-wide
    :class:`~sync.shared_budget.SharedRateBudget`)."""

    def acquire(self, deadline: Deadline | None = None) -> None: ...
