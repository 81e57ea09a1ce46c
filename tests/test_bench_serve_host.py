"""benchmarks/bench_serve_host.py: a real server's CPU time per streamed token, by thread,
and its engine step, with the model's forward taken out; its engine in the server's process
or in an engine process of its own."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_serve_host.py"


@pytest.mark.slow
@pytest.mark.integration
def test_bench_serve_host_splits_the_servers_time_by_thread_and_process() -> None:
    """With the engine in a process of its own (the case with the more parts: a server in
    one process differs in the ceiling's sum and the engine process's 0)."""
    argv = [str(SCRIPT), "--concurrency", "4", "--max-tokens", "12", "--repeats", "1"]
    argv += ["--device-ms", "20", "--engine-process"]
    done = subprocess.run([sys.executable, *argv], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].startswith("machine: ") and "; flags: " in lines[0]
    head = "4 streams x 12 tokens, /v1/completions, simulated device 20 ms a step"
    assert lines[1] == f"{head}, engine process; server CPU us per streamed token, medians:"
    header, row = [line for line in lines if line.startswith("| ")]
    names = [cell.strip() for cell in header.strip("|").split("|")]
    values = [float(cell.replace(",", "")) for cell in row.strip("|").split("|")]
    cells = dict(zip(names, values, strict=True))
    loop, engine, output = cells["event loop"], cells["engine loop"], cells["output thread"]
    server, engine_side = cells["server process"], cells["engine process"]
    whole = cells["whole server"]
    assert loop > 0 and engine > 0 and output > 0 and cells["client's tok/s"] > 0
    # the event loop is the server process's, the engine loop and output thread the child's
    assert server >= loop and engine_side >= engine + output > 0
    assert whole == pytest.approx(server + engine_side, abs=0.2) and cells["rest"] >= 0
    # each process's threads take turns; the busier process sets the pace
    assert cells["ceiling (tok/s)"] == pytest.approx(1e6 / max(server, engine_side), rel=0.01)
    # each step waits for the simulated device; four streams make at most four tokens a step
    assert cells["engine step (ms)"] >= 18 and 1 <= cells["tokens a step"] <= 4
