"""Native CPU kernels against the torch path they replace, on benchmark-model shapes.

    python benchmarks/bench_kernels.py [--seqs 32] [--threads 2]

Each line times one layer's worth of work both ways (median of repeated calls) and prints
the ratio. Where the kernels have the bfloat16-weight matmul (AVX2 and FMA), the gate/up
projection with bfloat16 weight values is timed as held in float32 for oneDNN (the torch
path) and as kept in bfloat16 for our kernel, at the decode batch and at the prefill rows,
and an 8B model's down_proj (14336 inputs) at the decode batch.
Shapes follow the issue-3 benchmark model: 12 query heads over 2 KV heads of dim 64, hidden
768, intermediate 2048, 16-slot blocks, float32; decode contexts are uniform in 64-768
tokens, scattered over a cache like a busy engine's.
"""

from __future__ import annotations

import argparse
import random
import sys
from collections.abc import Callable

import torch

from auto_glm.bench.machine import cpu_line
from auto_glm.bench.timing import median_seconds
from auto_glm.kernels import cpu_kernels
from auto_glm.layers.attention import Attention, AttentionMetadata, attention_metadata
from auto_glm.layers.linear import Linear, SiluAndMul
from auto_glm.layers.norm import RMSNorm


def _decode_attention(seqs: int, kernels) -> tuple[Callable[[], object], Callable[[], object]]:
    heads, kv_heads, dim, block = 12, 2, 64, 16
    rng = random.Random(0)
    lens = [rng.randint(64, 768) for _ in range(seqs)]
    blocks = [-(-n // block) for n in lens]
    total = sum(blocks) * 4  # a cache four times fuller than these sequences need
    order = (torch.randperm(total - 1) + 1).tolist()
    tables, width = [], max(blocks)
    for count in blocks:
        tables.append(order[:count] + [0] * (width - count))
        order = order[count:]
    plain, native = (Attention(heads, kv_heads, dim, dim**-0.5) for _ in range(2))
    for attn in (plain, native):
        attn.k_cache = torch.randn(total * block, kv_heads, dim)
        attn.v_cache = torch.randn(total * block, kv_heads, dim)
    native.enable_cpu_kernels(kernels)
    q = torch.randn(seqs, heads, dim)
    k = torch.randn(seqs, kv_heads, dim)

    def step(attn: Attention) -> Callable[[], object]:
        md = AttentionMetadata(
            slot_mapping=torch.tensor([t[0] * block for t in tables]),
            num_decodes=seqs,
            decode_block_tables=torch.tensor(tables),
            decode_context_lens=torch.tensor(lens),
        )

        def run() -> object:
            with attention_metadata(md):
                return attn(q, k, k)

        return run

    return step(plain), step(native)


def _pair(module: Callable[[], torch.nn.Module], kernels, x_shape, *extra):
    plain, native = module(), module()
    native.enable_kernels(kernels)
    x = torch.randn(x_shape)
    extra_args = [torch.randn(s) for s in extra]
    return (
        lambda: plain(x, *[e.clone() for e in extra_args]),
        lambda: native(x, *[e.clone() for e in extra_args]),
    )


def _linear(
    rows: int, kernels, inputs: int = 768, outputs: int = 4096
) -> tuple[Callable[[], object], Callable[[], object]]:
    """A projection (the gate/up one by default) of weights whose values are bfloat16: held
    in float32 and packed for oneDNN, against kept in bfloat16 for our kernel."""
    weight = torch.randn(outputs, inputs).bfloat16().float()  # [out, in]
    plain, native = Linear(inputs, outputs, bias=False), Linear(inputs, outputs, bias=False)
    for layer, values_dtype in ((plain, None), (native, torch.bfloat16)):
        layer.weight.data.copy_(weight)
        layer.enable_cpu_kernels(kernels)
        layer.prepack(rows, values_dtype=values_dtype)
    x = torch.randn(rows, inputs)  # [rows, in]
    return (lambda: plain(x)), (lambda: native(x))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seqs", type=int, default=32, help="decode batch (default: 32)")
    parser.add_argument("--prefill-tokens", type=int, default=512, help="rows for the norms")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default: 2)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    kernels = cpu_kernels()
    if kernels is None:
        print("the native kernels could not be built here (see the warning above)")
        return 1
    rows = args.prefill_tokens
    cases = {
        f"decode attention, {args.seqs} sequences": _decode_attention(args.seqs, kernels),
        f"RMSNorm + residual add, {rows} x 768": _pair(
            lambda: RMSNorm(768, 1e-5), kernels, (rows, 768), (rows, 768)
        ),
        f"SiLU-and-multiply, {rows} x 2048": _pair(SiluAndMul, kernels, (rows, 4096)),
    }
    if kernels.avx2_linear_available():
        for n in (args.seqs, rows):
            cases[f"linear 768 -> 4096 of bf16 weights, {n} rows"] = _linear(n, kernels)
        # an 8B model's down_proj (Llama-3-8B: 14336 -> 4096), more inputs than fit in L1
        name = f"linear 14336 -> 4096 of bf16 weights (an 8B model's down_proj), {args.seqs} rows"
        cases[name] = _linear(args.seqs, kernels, 14336, 4096)
    print(cpu_line(("avx2", "fma", "avx512f", "avx512_bf16", "amx_bf16")))
    print(f"torch {torch.__version__}, {args.threads} threads, float32")
    print("| work (one layer) | torch path (ms) | native kernel (ms) | torch / native |")
    print("|---|---:|---:|---:|")
    with torch.inference_mode():
        for name, (plain, native) in cases.items():
            t_plain, t_native = median_seconds(plain), median_seconds(native)
            ratio = t_plain / t_native
            print(f"| {name} | {t_plain * 1e3:.2f} | {t_native * 1e3:.2f} | {ratio:.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
