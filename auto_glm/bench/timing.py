"""Timing one call repeatedly, for the kernel and layer benchmarks under ``benchmarks/``."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

__all__ = ["median_seconds"]

_WARMUP_CALLS = 3  # first calls pay one-off costs: allocation, primitive creation, caches


def median_seconds(fn: Callable[[], object], repeats: int = 30) -> float:
    """The median wall time of ``repeats`` calls of ``fn``, after a few untimed ones."""
    for _ in range(_WARMUP_CALLS):
        fn()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)
