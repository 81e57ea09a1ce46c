"""INT8 quantization (issue 14): quality against bf16, then speed, weight and KV memory.

Quality: on the five tiny random architectures (bf16 checkpoints) and the engine
benchmark's model (``auto_glm.bench``: ~122M parameters, GLM-4 shape, random bf16 weights),
each mode's next-token distribution is compared with the bf16 model's, teacher-forced over
the same tokens of a fixed text set: mean KL(bf16 || mode), top-1 agreement and logit
cosine similarity, over every position. Every position attends through the KV cache, as a
decode does (the prefill reads its own K/V back from the cache), so the ``kv int8`` and
``kv fp8`` rows (``kv_cache_dtype`` int8 / fp8_e4m3, bf16 weights) measure the quantized
cache; for a float cache this is the same as attending to the fresh K/V. The ``kv int8
static`` and ``kv fp8 static`` rows use static scales calibrated at load
(``kv_cache_scales='calibrate'``, over the built-in corpus's text, not this text set): one
per (layer, KV head), so the cache holds exactly twice the tokens of a bf16 one.

Speed and memory, in the same run: the engine benchmark's seeded workload (``--requests``,
default 16 of its 32 requests: a shortened version, same seed and length ranges) through our
engine with bf16 weights, ``int8``, ``w8a8``, ``w8a8`` with ``quantize_lm_head``, and bf16
weights with an int8 and an fp8 KV cache, after one warm-up, ``--runs`` times each,
round-robin; median output tokens/s, the bytes of the linear layers' weights (but
lm_head's) and of all weights, and the tokens the KV cache holds in the same 256 MiB.
``--kv-only`` keeps the KV rows and the bf16 baseline only.

    python benchmarks/bench_quant.py [--requests 16] [--runs 2] [--threads 2] [--kv-only]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

# Runs from a source checkout too, where auto_glm is not installed.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from auto_glm.bench.machine import cpu_line
from auto_glm.bench.model import bench_model_path, prompt_vocab  # noqa: E402
from auto_glm.bench.ours import OurEngine  # noqa: E402
from auto_glm.bench.workload import Workload, make_workload  # noqa: E402
from auto_glm.checkpoints import build_random_checkpoint  # noqa: E402
from auto_glm.engine.kv_scales import calibrate_kv_scales  # noqa: E402
from auto_glm.engine.threads import on_own_thread  # noqa: E402
from auto_glm.kernels import cpu_kernels  # noqa: E402
from auto_glm.layers.attention import AttentionMetadata, PrefillChunk, attention_metadata  # noqa: E402
from auto_glm.layers.linear import Linear  # noqa: E402
from auto_glm.layers.quant import Int8Linear  # noqa: E402
from auto_glm.loader import load_model  # noqa: E402

__all__ = ["main", "weight_bytes"]

_FLAGS = ("avx512f", "avx512_bf16", "amx_bf16", "amx_int8", "amx_tile", "avx512_vnni", "avx_vnni")
# speed rows: label -> (quantization, quantize_lm_head, kv_cache_dtype)
MODES: dict[str, tuple[str, bool, str]] = {
    "bf16": ("none", False, "auto"),
    "int8": ("int8", False, "auto"),
    "w8a8": ("w8a8", False, "auto"),
    "w8a8+head": ("w8a8", True, "auto"),
    "kv int8": ("none", False, "int8"),
    "kv fp8": ("none", False, "fp8_e4m3"),
    "kv int8 static": ("none", False, "int8"),
    "kv fp8 static": ("none", False, "fp8_e4m3"),
}
# rows with static KV scales calibrated at load (kv_cache_scales); the others are dynamic
STATIC = ("kv int8 static", "kv fp8 static")
# quality rows, each against the bf16 model computing in bf16: label -> (load_model
# options, kv_cache_dtype)
VARIANTS: dict[str, tuple[dict[str, Any], str]] = {
    "int8": ({"quantization": "int8", "compute_dtype": "bfloat16"}, "auto"),
    "w8a8": ({"quantization": "w8a8", "compute_dtype": "bfloat16"}, "auto"),
    "w8a8+head": (
        {"quantization": "w8a8", "quantize_lm_head": True, "compute_dtype": "bfloat16"},
        "auto",
    ),
    "kv int8": ({"compute_dtype": "bfloat16"}, "int8"),
    "kv fp8": ({"compute_dtype": "bfloat16"}, "fp8_e4m3"),
    "kv int8 static": ({"compute_dtype": "bfloat16"}, "int8"),
    "kv fp8 static": ({"compute_dtype": "bfloat16"}, "fp8_e4m3"),
    "fp32 math": ({"compute_dtype": "float32"}, "auto"),
}
KV_ROWS = ("bf16", "kv int8", "kv fp8", *STATIC, "fp32 math")  # what --kv-only keeps
KV_CACHE_MEMORY = 256 * 2**20
ARCHITECTURES = (
    "GlmForCausalLM",
    "Glm4ForCausalLM",
    "LlamaForCausalLM",
    "Qwen2ForCausalLM",
    "Qwen3ForCausalLM",
)
TEXTS = (
    "The quick brown fox jumps over the lazy dog while the farmer watches from the porch.",
    "In 1969, two astronauts walked on the Moon and returned safely to Earth.",
    "def add(a, b):\n    return a + b\n\nprint(add(2, 3))",
    "Paged attention stores keys and values in fixed-size blocks, like virtual memory.",
    "Bonjour, je voudrais un café et deux croissants, s'il vous plaît.",
    "Quantization maps each weight to one of 255 levels with a scale per output channel.",
    "She sold seashells by the seashore, and the shells she sold were surely seashells.",
    "Rain fell all night; by morning the river had risen over the old stone bridge.",
)


def _cpu() -> str:
    return cpu_line(_FLAGS)


def _logits(
    model: torch.nn.Module, ids: torch.Tensor, dtype: torch.dtype, kv_cache_dtype: str
) -> torch.Tensor:
    """ids [T] -> float64 logits [T, vocab]: one prefill with a scratch KV cache, every
    position attending through the cache (its slots are read back, dequantized)."""
    for attn in model.attention_layers():
        attn.allocate_cache(len(ids), dtype, kv_cache_dtype)
    slots = torch.arange(len(ids))
    md = AttentionMetadata(slot_mapping=slots, prefills=[PrefillChunk(0, len(ids), slots)])
    with torch.inference_mode(), attention_metadata(md):
        return model.compute_logits(model(ids, torch.arange(len(ids)))).double()


def _as_in_the_engine(loaded: Any) -> None:
    """INT8 layers compute as the engine's do: with the native kernels and pre-packed (the
    AMX kernels where the CPU has AMX, else oneDNN for w8a8 and torch for int8)."""
    kernels = cpu_kernels()
    for module in loaded.model.modules():
        if isinstance(module, Int8Linear):
            if kernels is not None:
                module.enable_cpu_kernels(kernels)
            module.prepack(loaded.dtype)


def _quality(path: Path, variants: list[str]) -> dict[str, dict[str, float]]:
    """Per variant: mean KL(bf16 || variant), top-1 agreement and mean logit cosine
    similarity; "fp32 math" (the same bf16 weights, float32 arithmetic) is the yardstick:
    how far bf16 arithmetic itself is from exact."""
    base = load_model(path, device="cpu", dtype="bfloat16", compute_dtype="bfloat16")
    vocab = base.hf_config.vocab_size
    texts = [torch.tensor([i % vocab for i in base.tokenizer.encode(t)]) for t in TEXTS]
    ref = torch.cat([_logits(base.model, ids, base.dtype, "auto") for ids in texts])  # [P, V]
    logp = ref.log_softmax(-1)
    out = {}
    for name in variants:
        options, kv_cache_dtype = VARIANTS[name]
        loaded = load_model(path, device="cpu", dtype="bfloat16", **options)
        _as_in_the_engine(loaded)
        if name in STATIC:
            scales = calibrate_kv_scales(loaded, kv_cache_dtype)
            for attn, pair in zip(loaded.model.attention_layers(), scales, strict=True):
                attn.static_kv_scales = pair
        got = torch.cat([_logits(loaded.model, ids, loaded.dtype, kv_cache_dtype) for ids in texts])
        logq = got.log_softmax(-1)
        out[name] = {
            "kl": float((logp.exp() * (logp - logq)).sum(-1).mean()),
            "top1": float((ref.argmax(-1) == got.argmax(-1)).double().mean()),
            "cosine": float(torch.nn.functional.cosine_similarity(ref, got, dim=-1).mean()),
            "positions": ref.shape[0],
        }
    return out


def weight_bytes(model: torch.nn.Module) -> tuple[int, int]:
    """(bytes of the linear layers' weights but lm_head's, bytes of every weight tensor)."""
    linear = 0
    for name, module in model.named_modules():
        if name == "lm_head":
            continue
        if isinstance(module, Int8Linear):
            linear += module.weight_bytes()
        elif isinstance(module, Linear):
            weight = module._packed if module._packed is not None else module.weight
            linear += weight.numel() * weight.element_size()
    everything = {id(t): t for t in (*model.parameters(), *model.buffers())}
    for module in model.modules():
        extra = getattr(module, "_packed", None)  # Linear's and Int8Linear's packed weights
        if extra is not None:
            everything[id(extra)] = extra
    return linear, sum(t.numel() * t.element_size() for t in everything.values())


def _speed(
    model_dir: Path, requests: int, seed: int, runs: int, modes: list[str]
) -> dict[str, dict[str, Any]]:
    """Each mode's engine times the workload ``runs`` times, round-robin with the others."""
    vocab = prompt_vocab(model_dir)
    workload = make_workload(requests, seed, vocab, (64, 512), (64, 256))
    warmup = make_workload(2, 12345, vocab, (16, 32), (4, 8))
    engines, out = {}, {}
    for label in modes:
        quantization, head, kv_cache_dtype = MODES[label]
        engine = engines[label] = on_own_thread(
            OurEngine, model_dir, 32, 512, KV_CACHE_MEMORY, quantization=quantization,
            quantize_lm_head=head, kv_cache_dtype=kv_cache_dtype,
            kv_cache_scales="calibrate" if label in STATIC else "dynamic",
        )  # fmt: skip
        client = engine.model.engine
        loaded = client.loaded
        linear, total = weight_bytes(loaded.model)
        out[label] = {
            "kv_tokens": client.num_blocks * client.config.block_size,
            "linear_mib": linear / 2**20,
            "all_mib": total / 2**20,
            "math": str(loaded.dtype).removeprefix("torch."),
        }

    def run(engine: OurEngine, work: Workload) -> float:
        # one engine thread (and OpenMP team) at a time: see auto_glm.bench.ours
        tokens_per_s = on_own_thread(engine.run, work).tokens_per_s
        engine.release()
        return tokens_per_s

    try:
        for engine in engines.values():
            run(engine, warmup)
        timed: dict[str, list[float]] = {mode: [] for mode in modes}
        for _ in range(runs):
            for mode, engine in engines.items():
                timed[mode].append(run(engine, workload))
        for mode in modes:
            out[mode].update(tokens_per_s=statistics.median(timed[mode]), runs=timed[mode])
    finally:
        for engine in engines.values():
            engine.close()
    return out


def _workload_tokens(model_dir: Path, args: argparse.Namespace) -> int:
    vocab = prompt_vocab(model_dir)
    return make_workload(args.requests, args.seed, vocab, (64, 512), (64, 256)).output_tokens


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=16, help="workload requests (default: 16)")
    parser.add_argument("--seed", type=int, default=0, help="workload seed (default: 0)")
    parser.add_argument("--runs", type=int, default=2, help="timed runs per mode (default: 2)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default: 2)")
    parser.add_argument(
        "--kv-only",
        action="store_true",
        help="only the KV cache rows (kv int8, kv fp8, dynamic and static) and their bf16 and "
        "fp32 baselines",
    )
    args = parser.parse_args(argv)
    variants = [v for v in VARIANTS if not args.kv_only or v in KV_ROWS]
    modes = [m for m in MODES if not args.kv_only or m in KV_ROWS]
    torch.set_num_threads(args.threads)
    print(f"cpu: {_cpu()}")
    print(f"torch {torch.__version__}, {args.threads} threads")
    bench_dir = on_own_thread(bench_model_path)
    print("\nquality against bf16, teacher-forced over the same tokens (fixed text set)")
    print(
        f"{'model':<34} {'variant':<14} {'positions':>9} {'mean KL':>10} {'top-1':>7} {'cosine':>8}"
    )
    with tempfile.TemporaryDirectory() as tmp:
        # torch work on threads that end with it, leaving no OpenMP team behind to slow the
        # engines timed below (auto_glm.engine.threads)
        bf16 = {"dtype": torch.bfloat16}
        models = [
            (arch, on_own_thread(build_random_checkpoint, Path(tmp) / arch, arch, **bf16))
            for arch in ARCHITECTURES
        ]
        for name, path in [*models, (f"bench model ({bench_dir.name})", bench_dir)]:
            for mode, q in on_own_thread(_quality, path, variants).items():
                print(
                    f"{name:<34} {mode:<14} {q['positions']:>9} {q['kl']:>10.2e} "
                    f"{q['top1']:>7.3f} {q['cosine']:>8.5f}"
                )
    print(
        f"\nspeed and memory: bench model, engine workload seed {args.seed}, "
        f"{args.requests} requests, prompts 64-512, outputs 64-256, max_num_seqs 32, "
        f"max_num_batched_tokens 512, kv_cache_memory {KV_CACHE_MEMORY // 2**20} MiB, one "
        f"warm-up then {args.runs} timed runs per mode, round-robin (median; "
        f"{_workload_tokens(bench_dir, args)} output tokens per run)"
    )
    speed = _speed(bench_dir, args.requests, args.seed, args.runs, modes)
    base = speed["bf16"]
    print(
        f"{'mode':<14} {'math':<9} {'tokens/s':>9} {'vs bf16':>8} {'runs (tokens/s)':<18} "
        f"{'linear MiB':>11} {'vs bf16':>8} {'all weights MiB':>16} {'KV tokens':>10} "
        f"{'vs bf16':>8}"
    )
    for mode, s in speed.items():
        print(
            f"{mode:<14} {s['math']:<9} {s['tokens_per_s']:>9.1f} "
            f"{s['tokens_per_s'] / base['tokens_per_s']:>7.2f}x "
            f"{' '.join(f'{r:.1f}' for r in s['runs']):<18} "
            f"{s['linear_mib']:>11.1f} {s['linear_mib'] / base['linear_mib']:>7.3f}x "
            f"{s['all_mib']:>16.1f} {s['kv_tokens']:>10} "
            f"{s['kv_tokens'] / base['kv_tokens']:>7.2f}x"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
