"""w8a8 linear layers on the CPU: the AMX kernel against oneDNN's INT8 path and bf16 (issue 14).

    python benchmarks/bench_int8_linear.py [--rows 1,16,32,64,512] [--threads 2]

One decoder's worth of linear layers of the engine benchmark's model (12 layers of q/k/v
768->1024, o 768->768, gate/up 768->4096 and down 2048->768, each with its own random
weight, so that every call reads its weight from beyond the core's caches as in a decode
step) is called once per layer, for each batch of rows; the median time of the whole pass:
- ``bf16``: ``Linear`` with its bfloat16 weight (oneDNN, AMX-BF16 where the CPU has it);
- ``onednn``: ``Int8Linear`` w8a8 with the native kernels quantizing and rescaling around
  oneDNN's ``qlinear_pointwise`` (the path on CPUs with VNNI but no AMX);
- ``amx``: ``Int8Linear`` w8a8 on the AMX kernel (``csrc/amx_linear.cpp``), what the engine
  uses where the CPU has AMX-INT8.
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
_FLAGS = ("avx512_bf16", "avx512_vnni", "amx_bf16", "amx_int8")


def _layers(kernels) -> dict[str, list[torch.nn.Module]]:
    """Every contender's layers, built from the same bf16 weights."""
    out: dict[str, list[torch.nn.Module]] = {"bf16": [], "onednn": [], "amx": []}
    for _ in range(LAYERS):
        for k, n in SHAPES:
            linear = Linear(k, n, bias=False).to(torch.bfloat16).requires_grad_(False)
            out["bf16"].append(linear)
            for matmul in ("onednn", "amx"):
                layer = Int8Linear.from_linear(linear, "w8a8", matmul)
                layer.enable_cpu_kernels(kernels)
                layer.prepack()
                out[matmul].append(layer)
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
    if kernels is None or not kernels.amx_int8_available():
        print("the AMX kernel needs the native kernels on a CPU with AMX-INT8: nothing to time")
        return 1
    layers = _layers(kernels)
    weights = sum(k * n for k, n in SHAPES) * LAYERS
    print(f"\n{LAYERS} layers x 4 linears, {weights / 2**20:.1f} MiB of INT8 weights; ms per pass")
    head = ("rows", "bf16", "onednn", "amx", "amx vs onednn", "amx vs bf16")
    print(" ".join(f"{h:>{w}}" for h, w in zip(head, (5, 8, 8, 8, 14, 12), strict=True)))
    for rows in (int(r) for r in args.rows.split(",")):
        x = {k: torch.randn(rows, k, dtype=torch.bfloat16) for k, _ in SHAPES}
        with torch.inference_mode():
            ms = {
                name: 1e3
                * median_seconds(lambda mods=mods, x=x: [m(x[m.in_features]) for m in mods], 20)
                for name, mods in layers.items()
            }
        print(
            f"{rows:>5} {ms['bf16']:>8.2f} {ms['onednn']:>8.2f} {ms['amx']:>8.2f} "
            f"{ms['onednn'] / ms['amx']:>13.2f}x {ms['bf16'] / ms['amx']:>11.2f}x"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
