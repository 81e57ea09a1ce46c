"""benchmarks/bench_kernels.py runs and reports each kernel against its torch path."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_kernels.py"


def test_bench_kernels_prints_one_ratio_per_kernel(kernels):
    args = ["--seqs", "3", "--prefill-tokens", "8", "--threads", "1"]
    done = subprocess.run(
        [sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    rows = [line for line in done.stdout.splitlines() if re.search(r"\| \d+\.\d\dx \|$", line)]
    assert [row.split("|")[1].split(",")[0].strip() for row in rows] == [
        "decode attention",
        "RMSNorm + residual add",
        "SiLU-and-multiply",
        *(["linear 768 -> 4096 of bf16 weights"] * 2 if kernels.bf16_avx2_available() else []),
    ]
