"""The bfloat16-weight linear kernel (auto_glm/kernels/csrc/bf16_linear.cpp) against oneDNN's
pre-packed float32 matmul on the same weight values, on an 8B model's shapes and the bench
model's, in one process.

    python benchmarks/bench_bf16_linear.py [--rows 1,16,64] [--shapes 14336x4096,...]

Each shape is ``INxOUT``; each line gives both times (median of ``--calls`` calls, after 3
untimed), their ratio, the kernel's GFLOP/s and the bytes of bf16 weight it read per second.
Run it in two trees to compare two versions of the kernel.
"""

from __future__ import annotations

import argparse
import sys
from functools import partial
from pathlib import Path

import torch

# Runs from a source checkout too, where auto_glm is not installed.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from auto_glm.bench.machine import cpu_line  # noqa: E402
from auto_glm.bench.timing import median_seconds  # noqa: E402
from auto_glm.kernels import cpu_kernels  # noqa: E402

SHAPES = "14336x4096,4096x28672,768x4096"  # down_proj and gate_up of Llama-3-8B, bench gate_up


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default="1,16,64", help="rows per call (default: 1,16,64)")
    parser.add_argument("--shapes", default=SHAPES, help=f"INxOUT,... (default: {SHAPES})")
    parser.add_argument("--calls", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(cpu_line(("avx2", "fma", "avx512f", "avx512_bf16", "amx_bf16")))
    kernels = cpu_kernels(timeout_s=None)
    if kernels is None or not kernels.bf16_avx2_available():
        print("the kernels have no bf16 matmul here (not built, or no AVX2 and FMA)")
        return 1
    print(f"torch {torch.__version__}, {args.threads} threads")
    for shape in args.shapes.split(","):
        inputs, outputs = map(int, shape.split("x"))
        weight = torch.randn(outputs, inputs).bfloat16().float()  # [out, in], bf16 values
        packed = kernels.pack_bf16_avx2(weight)
        for rows in map(int, args.rows.split(",")):
            x = torch.randn(rows, inputs)  # [rows, in]
            onednn = torch.ops.mkldnn._reorder_linear_weight(weight, rows)
            onednn_call = partial(
                torch.ops.mkldnn._linear_pointwise, x, onednn, None, "none", [], ""
            )
            plain = median_seconds(onednn_call, args.calls) * 1e3
            ours_call = partial(kernels.bf16_linear_avx2, x, packed, None, outputs)
            ours = median_seconds(ours_call, args.calls) * 1e3
            gflops = 2 * rows * inputs * outputs / ours / 1e6
            gbs = 2 * inputs * outputs / ours / 1e6
            print(
                f"{inputs} -> {outputs}, {rows} rows: oneDNN float32 {plain:.2f} ms, "
                f"bf16 kernel {ours:.2f} ms, {plain / ours:.2f}x, {gflops:.0f} GFLOP/s, "
                f"{gbs:.1f} GB/s of bf16 weight"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
