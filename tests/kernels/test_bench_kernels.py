"""benchmarks/bench_kernels.py runs and reports each kernel against its torch path, and
benchmarks/bench_avx2_linear.py the narrow-weight matmul against oneDNN."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

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
        *(
            ["linear 768 -> 4096 of bf16 weights"] * 2
            + ["linear 14336 -> 4096 of bf16 weights (an 8B model's down_proj)"]
            if kernels.avx2_linear_available()
            else []
        ),
    ]


AVX2_SCRIPT = SCRIPT.with_name("bench_avx2_linear.py")


def test_bench_avx2_linear_prints_a_line_per_shape_and_rows(kernels):
    if not kernels.avx2_linear_available():
        pytest.skip("the kernels were built for a CPU without AVX2, FMA and F16C")
    args = ["--rows", "1,7", "--shapes", "40x20,1100x48", "--calls", "2", "--threads", "1"]
    done = subprocess.run(
        [sys.executable, str(AVX2_SCRIPT), *args], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    cell = r"\d+\.\d\d ms \d+\.\d\dx \d+\.\d GB/s"
    formats = rf"bf16 {cell} \| f16 {cell} \| int8 {cell}$"
    lines = [ln for ln in done.stdout.splitlines() if re.search(formats, ln)]
    assert [ln.split(":")[0] for ln in lines] == [
        "40 -> 20, 1 rows",
        "40 -> 20, 7 rows",
        "1100 -> 48, 1 rows",
        "1100 -> 48, 7 rows",
    ]
