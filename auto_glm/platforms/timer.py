"""Time spent in the model's forward pass, summed over steps, without stalling the device.

The engine reports it beside its step time, so that the difference measures the host's
overhead. :class:`WallTimer` reads the host clock (the CPU computes as the host runs).
:class:`CudaEventTimer` records a pair of CUDA events per step and reads their elapsed
time once the device has passed the second one (found by a non-blocking query), so timing
adds no host-device sync to a step.
"""

from __future__ import annotations

import threading
import time
from collections import deque

import torch

__all__ = ["CudaEventTimer", "StepTimer", "WallTimer"]


class StepTimer:
    """``start()`` and ``stop()`` around each forward pass; ``total()`` seconds so far."""

    def start(self) -> None:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError

    def total(self) -> float:
        raise NotImplementedError


class WallTimer(StepTimer):
    def __init__(self) -> None:
        self._total = 0.0
        self._start = 0.0

    def start(self) -> None:
        self._start = time.perf_counter()

    def stop(self) -> None:
        self._total += time.perf_counter() - self._start

    def total(self) -> float:
        return self._total


class CudaEventTimer(StepTimer):
    """Device time between each step's two events. ``total()`` (safe on any thread) counts
    the steps the device has finished; one still running is counted once it is done."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._total = 0.0
        self._pending: deque[tuple[torch.cuda.Event, torch.cuda.Event]] = deque()
        self._spare: list[torch.cuda.Event] = []  # recycled: no event is created per step
        self._current: torch.cuda.Event | None = None
        self._lock = threading.Lock()

    def _event(self) -> torch.cuda.Event:
        return self._spare.pop() if self._spare else torch.cuda.Event(enable_timing=True)

    def start(self) -> None:
        with self._lock:
            self._current = self._event()
        self._current.record(torch.cuda.current_stream(self.device))

    def stop(self) -> None:
        end = self._event()
        end.record(torch.cuda.current_stream(self.device))
        with self._lock:
            self._pending.append((self._current, end))
            self._resolve()

    def total(self) -> float:
        with self._lock:
            self._resolve()
            return self._total

    def _resolve(self) -> None:
        """Add the elapsed time of every finished pair, oldest first (caller holds the lock)."""
        while self._pending and self._pending[0][1].query():
            start, end = self._pending.popleft()
            self._total += start.elapsed_time(end) / 1e3  # milliseconds
            self._spare += (start, end)
