"""What one timed run of one contender measured, and how a report is written."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["EngineOverhead", "RunResult", "write_report"]


def write_report(path: Path, report: Any, indent: int = 2) -> None:
    """``report`` as JSON in ``path``, replaced whole: a benchmark stopped by a time limit
    while writing leaves the report it wrote before, never half of one."""
    staging = path.with_name(f".{path.name}.{os.getpid()}")
    staging.write_text(json.dumps(report, indent=indent) + "\n")
    os.replace(staging, path)


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
    steps_ahead: int  # of which planned and launched while the step before still ran
    step_time: float
    forward_time: float
    share: float
    full_batch_steps: int
    full_batch_share: float | None
    prefix_cache_hits: int  # tokens; 0 unless the workload repeats itself
    gc_time: float  # seconds garbage collections held the process (every thread) in the run


@dataclass(frozen=True)
class RunResult:
    seconds: float
    num_requests: int
    output_tokens: int  # the timed requests' own output lengths, checked exactly
    overhead: EngineOverhead | None = None  # our engine only

    @property
    def tokens_per_s(self) -> float:
        return self.output_tokens / self.seconds
