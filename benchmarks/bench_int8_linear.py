"""INT8 linear layers on the CPU: our AMX and AVX2 kernels against oneDNN's and torch's INT8
paths and bf16 (issue 14).

    python benchmarks/bench_int8_linear.py [--rows 1,16,32,64,512] [--threads 2]

One decoder's worth of linear layers of the engine benchmark's model (12 layers of q/k/v
768->1024, o 768->768, gate/up 768->4096 and down 2048->768, each with its own random
weight, so that every call reads its weight from beyond the core's caches as in a decode
step) is called once per layer with bfloat16 activations, for each batch of rows; the
median time of the whole pass, in ms:
- ``bf16``: ``Linear`` with its bfloat16 weight (oneDNN, AMX-BF16 where the CPU has it);
- ``int8 torch``: ``Int8Linear`` int8 on torch's paths (``_weight_int8pack_mm`` up to 8
  rows, the weight converted per call beyond);
- ``int8 avx2``: ``Int8Linear`` int8 on the AVX2 kernel (``csrc/avx2_linear.cpp``, the
  activations widened to float32), where the CPU has AVX2, FMA and F16C;
- where the CPU has AMX: ``int8 amx``, ``Int8Linear`` int8 on the AMX-BF16 kernel
  (``csrc/amx_weight_only.cpp``); ``w8a8 onednn``, ``Int8Linear`` w8a8 with the native
  kernels quantizing and rescaling around oneDNN's ``qlinear_pointwise`` (the path on CPUs
  with VNNI but no AMX); ``w8a8 amx``, ``Int8Linear`` w8a8 on the AMX-INT8 kernel
  (``csrc/amx_linear.cpp``).
The engine takes the AMX kernels where the CPU has AMX, else the AVX2 one for int8. Each
kernel's contender also gets its ratio to bf16.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from auto_glm.bench.machine import cpu_line  # noqa: E402
from auto_glm.bench.timing import median_seconds  # noqa: E402
from auto_glm.kernels import cpu_kernels  # noqa: E402
from auto_glm.layers.linear import Linear  # noqa: E402
from auto_glm.layers.quant import Int8Linear  # noqa: E402

LAYERS = 12
SHAPES = ((768, 1024), (768, 768), (768, 4096), (2048, 768))  # (in, out) of one decoder layer
_FLAGS = ("avx2", "fma", "f16c", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_int8")
# contender -> (mode, matmul) of its Int8Linear layers
INT8 = {
    "int8 torch": ("int8", "onednn"),
    "int8 avx2": ("int8", "avx2"),
    "int8 amx": ("int8", "amx"),
    "w8a8 onednn": ("w8a8", "onednn"),
    "w8a8 amx": ("w8a8", "amx"),
}
# contenders that need AMX, and the kernels' own, which get a ratio to bf16
NEEDS_AMX = ("int8 amx", "w8a8 onednn", "w8a8 amx")
KERNELS = ("int8 avx2", "int8 amx", "w8a8 amx")


def _contenders(kernels) -> list[str]:
    """The contenders this CPU and build can run."""
    out = ["bf16", "int8 torch"]
    if kernels.avx2_linear_available():
        out.append("int8 avx2")
    if kernels.amx_available():
        out.extend(NEEDS_AMX)
    return out


def _layers(kernels, names: list[str]) -> dict[str, list[torch.nn.Module]]:
    """Every contender's layers, built from the same bf16 weights."""
    out: dict[str, list[torch.nn.Module]] = {name: [] for name in names}
    for _ in range(LAYERS):
        for k, n in SHAPES:
            linear = Linear(k, n, bias=False).to(torch.bfloat16).requires_grad_(False)
            out["bf16"].append(linear)
            for name in names[1:]:
                mode, matmul = INT8[name]
                layer = Int8Linear.from_linear(linear, mode, matmul)
                layer.enable_cpu_kernels(kernels)
                layer.prepack(torch.bfloat16)
                out[name].append(layer)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default="1,16,32,64,512", help="batches of rows to time")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default: 2)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"cpu: {cpu_line(_FLAGS)}")
    print(f"torch {torch.__version__}, {args.threads} threads")
    kernels = cpu_kernels()
    if kernels is None or not (kernels.amx_available() or kernels.avx2_linear_available()):
        print("the INT8 kernels need the native kernels on a CPU with AMX, or AVX2, FMA and F16C")
        return 1
    names = _contenders(kernels)
    layers = _layers(kernels, names)
    weights = sum(k * n for k, n in SHAPES) * LAYERS
    print(f"\n{LAYERS} layers x 4 linears, {weights / 2**20:.1f} MiB of INT8 weights; ms per pass")
    ratios = [name for name in names if name in KERNELS]
    head = ["rows", *names, *(f"{name} vs bf16" for name in ratios)]
    widths = [5, *(max(len(n), 8) for n in names), *(len(n) + 8 for n in ratios)]
    print(" ".join(f"{h:>{w}}" for h, w in zip(head, widths, strict=True)))
    for rows in (int(r) for r in args.rows.split(",")):
        x = {k: torch.randn(rows, k, dtype=torch.bfloat16) for k, _ in SHAPES}
        with torch.inference_mode():
            ms = {
                name: 1e3
                * median_seconds(lambda mods=mods, x=x: [m(x[m.in_features]) for m in mods], 20)
                for name, mods in layers.items()
            }
        cells = [
            f"{rows}",
            *(f"{ms[n]:.2f}" for n in names),
            *(f"{ms['bf16'] / ms[n]:.2f}x" for n in ratios),
        ]
        print(" ".join(f"{c:>{w}}" for c, w in zip(cells, widths, strict=True)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
