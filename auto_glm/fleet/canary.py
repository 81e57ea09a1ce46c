"""A version's recent outcomes, and the check that decides a canary's rollback.

The engine's finish listener adds one outcome per finished request (on the engine's output
thread); :func:`breach` reads the window from whichever thread evaluates the rule.
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from dataclasses import dataclass

from auto_glm.fleet.traffic import OUTCOMES_KEPT_S, RollbackRule

__all__ = ["OutcomeWindow", "WindowSummary", "breach"]


@dataclass(frozen=True)
class WindowSummary:
    requests: int
    errors: int
    p95_ttft_s: float | None

    @property
    def error_rate(self) -> float:
        return self.errors / self.requests if self.requests else 0.0


class OutcomeWindow:
    """Outcomes of the last ``horizon_s`` seconds: (time, failed, time to first token)."""

    def __init__(self, horizon_s: float = OUTCOMES_KEPT_S) -> None:
        self.horizon_s = horizon_s
        self._items: deque[tuple[float, bool, float | None]] = deque()
        self._lock = threading.Lock()

    def add(self, failed: bool, ttft: float | None, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        with self._lock:
            self._items.append((now, failed, ttft))
            while self._items and self._items[0][0] < now - self.horizon_s:
                self._items.popleft()

    def clear(self) -> None:
        with self._lock:
            self._items.clear()

    def summary(self, window_s: float, now: float | None = None) -> WindowSummary:
        now = time.monotonic() if now is None else now
        with self._lock:
            recent = [item for item in self._items if item[0] >= now - window_s]
        ttfts = sorted(t for _, failed, t in recent if not failed and t is not None)
        p95 = ttfts[max(math.ceil(0.95 * len(ttfts)) - 1, 0)] if ttfts else None
        return WindowSummary(len(recent), sum(1 for _, f, _ in recent if f), p95)


def breach(rule: RollbackRule, window: OutcomeWindow, now: float | None = None) -> str | None:
    """Why ``window`` breaks ``rule`` (a sentence for the log and the admin API), or None."""
    seen = window.summary(rule.window_s, now)
    if seen.requests < rule.min_requests:
        return None
    if rule.max_error_rate is not None and seen.error_rate > rule.max_error_rate:
        return (
            f"error rate {seen.error_rate:.3f} over the last {rule.window_s:g} s "
            f"({seen.errors} of {seen.requests} requests) is above max_error_rate="
            f"{rule.max_error_rate:g}"
        )
    if (
        rule.max_p95_ttft_s is not None
        and seen.p95_ttft_s is not None
        and seen.p95_ttft_s > rule.max_p95_ttft_s
    ):
        return (
            f"p95 time to first token {seen.p95_ttft_s:.3f} s over the last "
            f"{rule.window_s:g} s ({seen.requests} requests) is above max_p95_ttft_s="
            f"{rule.max_p95_ttft_s:g}"
        )
    return None
