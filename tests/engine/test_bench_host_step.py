"""benchmarks/bench_host_step.py times the host's work per decode step on the padded
decode path, with the model's forward replaced by fixed logits."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_host_step.py"


def test_bench_host_step_reports_each_batch(tmp_path: Path) -> None:
    argv = [str(SCRIPT), "--batches", "2", "5", "--steps", "12", "--repeats", "1"]
    argv += ["--work-dir", str(tmp_path)]
    done = subprocess.run([sys.executable, *argv], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].startswith("machine: ") and "; flags: " in lines[0]
    rows = [
        line.strip("|").split("|") for line in lines if line.startswith("| ") and "---" not in line
    ]
    assert rows[0][0].strip() == "batch"
    for (batch, steps, loop, output, gc, wall), want in zip(rows[1:], (2, 5), strict=True):
        assert int(batch) == want and int(steps) >= 12
        assert float(loop) > 0 and float(output) > 0 and float(gc) >= 0 and float(wall) > 0
    assert (tmp_path / "qwen3-tiny" / "config.json").is_file()
