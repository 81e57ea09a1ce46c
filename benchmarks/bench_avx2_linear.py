"""The AVX2 narrow-weight linear kernel (auto_glm/kernels/csrc/avx2_linear.cpp) on bfloat16,
float16 and int8 weights against oneDNN's pre-packed float32 matmul on the same weight
values, on an 8B model's shapes and the bench model's, in one process.

    python benchmarks/bench_avx2_linear.py [--rows 1,16,64] [--shapes 14336x4096,...]

Each shape is ``INxOUT``; each line gives oneDNN's time and, for each weight format, the
kernel's time (median of ``--calls`` calls, after 3 untimed), oneDNN's time over it and the
bytes of weight it read per second. The int8 weight is the bf16 one quantized per output
channel, as ``quantization='int8'`` does. Run it in two trees to compare two versions.
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
from auto_glm.layers.quant import quantize_rows  # noqa: E402

SHAPES = "14336x4096,4096x28672,768x4096"  # down_proj and gate_up of Llama-3-8B, bench gate_up
FORMATS = (("bf16", torch.bfloat16), ("f16", torch.float16), ("int8", torch.int8))


def _packed(kernels, weight: torch.Tensor) -> dict[str, tuple[torch.Tensor, torch.Tensor | None]]:
    """Each format's packed weight and channel scales, from a float32 [out, in] weight."""
    q, scales = quantize_rows(weight)
    out = {}
    for name, dtype in FORMATS:
        source = q if dtype == torch.int8 else weight.to(dtype)
        out[name] = (
            kernels.pack_linear_avx2(source, dtype),
            (scales.view(-1) if dtype == torch.int8 else None),
        )
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default="1,16,64", help="rows per call (default: 1,16,64)")
    parser.add_argument("--shapes", default=SHAPES, help=f"INxOUT,... (default: {SHAPES})")
    parser.add_argument("--calls", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(cpu_line(("avx2", "fma", "f16c", "avx512f", "avx512_bf16", "amx_bf16")))
    kernels = cpu_kernels(timeout_s=None)
    if kernels is None or not kernels.avx2_linear_available():
        print("the kernels have no AVX2 matmul here (not built, or no AVX2, FMA and F16C)")
        return 1
    print(f"torch {torch.__version__}, {args.threads} threads")
    for shape in args.shapes.split(","):
        inputs, outputs = map(int, shape.split("x"))
        weight = torch.randn(outputs, inputs).bfloat16().float()  # [out, in], bf16 values
        packed = _packed(kernels, weight)
        for rows in map(int, args.rows.split(",")):
            x = torch.randn(rows, inputs)  # [rows, in]
            onednn = torch.ops.mkldnn._reorder_linear_weight(weight, rows)
            onednn_call = partial(
                torch.ops.mkldnn._linear_pointwise, x, onednn, None, "none", [], ""
            )
            plain = median_seconds(onednn_call, args.calls) * 1e3
            cells = [f"oneDNN float32 {plain:.2f} ms"]
            for name, (weights, scales) in packed.items():
                call = partial(kernels.linear_avx2, x, weights, scales, None, outputs)
                ours = median_seconds(call, args.calls) * 1e3
                gbs = weights.numel() * weights.element_size() / ours / 1e6
                cells.append(f"{name} {ours:.2f} ms {plain / ours:.2f}x {gbs:.1f} GB/s")
            print(f"{inputs} -> {outputs}, {rows} rows: " + " | ".join(cells))
    return 0


if __name__ == "__main__":
    sys.exit(main())
