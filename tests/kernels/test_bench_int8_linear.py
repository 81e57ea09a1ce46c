"""benchmarks/bench_int8_linear.py times the AMX kernel against oneDNN and bf16, or says
why it cannot."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_int8_linear.py"


def test_bench_int8_linear_prints_a_row_per_batch(kernels):
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--rows", "1,17", "--threads", "1"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    if not kernels.amx_available():
        assert done.returncode == 1 and "CPU with AMX" in done.stdout
        return
    assert done.returncode == 0, done.stderr
    rows = [
        line.split() for line in done.stdout.splitlines() if line.split()[:1] in (["1"], ["17"])
    ]
    assert [row[0] for row in rows] == ["1", "17"]
    for row in rows:  # rows, five times in ms, two ratios
        assert len(row) == 8 and all(float(t) > 0 for t in row[1:6])
        assert row[6].endswith("x") and row[7].endswith("x")
