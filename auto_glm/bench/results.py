"""What one timed run of one contender measured."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["EngineOverhead", "RunResult"]


@dataclass(frozen=True)
class EngineOverhead:
    """Where our engine's step time went during one run (seconds, from its stats).

    ``share`` is the time outside the model's forward (scheduling, batch preparation,
    sampling) as a fraction of step time over the whole run; ``full_batch_share`` is the
    same over the window in which every request of the run was running (``None`` when the
    window was too short to measure). The window is found by polling the engine's
    cumulative counters, skipping samples caught mid-update, so it starts and ends on step
    boundaries.
    """

    steps: int
    step_time: float
    forward_time: float
    share: float
    full_batch_steps: int
    full_batch_share: float | None
    prefix_cache_hits: int  # tokens; 0 unless the workload repeats itself


@dataclass(frozen=True)
class RunResult:
    seconds: float
    num_requests: int
    output_tokens: int  # the timed requests' own output lengths, checked exactly
    overhead: EngineOverhead | None = None  # our engine only

    @property
    def tokens_per_s(self) -> float:
        return self.output_tokens / self.seconds
