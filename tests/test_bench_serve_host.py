"""benchmarks/bench_serve_host.py: a real server's CPU time per streamed token, by thread,
and its engine step, with the model's forward taken out."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_serve_host.py"


@pytest.mark.slow
@pytest.mark.integration
def test_bench_serve_host_splits_the_servers_time_by_thread() -> None:
    argv = [str(SCRIPT), "--concurrency", "4", "--max-tokens", "12", "--repeats", "1"]
    argv += ["--device-ms", "20"]
    done = subprocess.run([sys.executable, *argv], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].startswith("machine: ") and "; flags: " in lines[0]
    assert lines[1].startswith("4 streams x 12 tokens, /v1/completions, simulated device 20 ms")
    (row,) = [line for line in lines if line.startswith("| ") and "---" not in line][1:]
    loop, engine, output, rest, whole, ceiling, step, per_step, tok_s = (
        float(cell.replace(",", "")) for cell in row.strip("|").split("|")
    )
    assert loop > 0 and engine > 0 and output > 0 and tok_s > 0
    assert rest >= 0 and whole >= loop + engine + output  # the threads are the process's
    assert ceiling == pytest.approx(1e6 / (loop + engine + output), rel=0.01, abs=1)
    # each step waits for the simulated device; four streams make at most four tokens a step
    assert step >= 18 and 1 <= per_step <= 4
