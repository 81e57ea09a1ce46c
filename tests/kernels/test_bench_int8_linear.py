"""benchmarks/bench_int8_linear.py times the INT8 kernels this CPU has against torch's
paths and bf16, or says why it cannot."""

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
    amx, avx2 = kernels.amx_available(), kernels.avx2_linear_available()
    if not (amx or avx2):
        assert done.returncode == 1 and "CPU with AMX, or AVX2" in done.stdout
        return
    assert done.returncode == 0, done.stderr
    names = ["bf16", "int8 torch"] + ["int8 avx2"] * avx2
    names += ["int8 amx", "w8a8 onednn", "w8a8 amx"] * amx
    ratios = ["int8 avx2"] * avx2 + ["int8 amx", "w8a8 amx"] * amx
    header = next(line for line in done.stdout.splitlines() if line.split()[:1] == ["rows"])
    assert (
        header.split()
        == ["rows", *" ".join(names).split()] + " ".join(f"{n} vs bf16" for n in ratios).split()
    )
    rows = [
        line.split() for line in done.stdout.splitlines() if line.split()[:1] in (["1"], ["17"])
    ]
    assert [row[0] for row in rows] == ["1", "17"]
    for row in rows:  # rows, a time in ms per contender, a ratio per kernel
        assert len(row) == 1 + len(names) + len(ratios)
        assert all(float(t) > 0 for t in row[1 : 1 + len(names)])
        assert all(r.endswith("x") for r in row[1 + len(names) :])
