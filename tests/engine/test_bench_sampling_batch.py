"""benchmarks/bench_sampling_batch.py times the sampling batch's build per decode step for
penalized requests, in turn and planned ahead."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_sampling_batch.py"


def test_bench_sampling_batch_prints_a_row_per_output_length() -> None:
    argv = [str(SCRIPT), "--batch", "4", "--outputs", "3", "50", "--steps", "3"]
    done = subprocess.run([sys.executable, *argv], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("machine: ") and "; flags: " in done.stdout.splitlines()[0]
    rows = re.findall(r"^\| 4 \| (\d+) \| ([\d.]+) \| ([\d.]+) \|$", done.stdout, re.MULTILINE)
    assert [r[0] for r in rows] == ["3", "50"]
    assert all(float(turn) > 0 and float(ahead) > 0 for _, turn, ahead in rows)
