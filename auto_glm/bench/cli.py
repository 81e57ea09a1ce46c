"""``autoglm bench`` and ``benchmarks/bench_engine.py``: arguments, printing, JSON output.

``--workload issue3`` (the default) is issue 3's CPU benchmark against several transformers
contenders; ``--workload nano`` is nano-vllm's benchmark (issue 13, see ``nano_runner``).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from auto_glm.bench.nano import HF_CONTENDERS, NanoOptions
from auto_glm.bench.nano_report import format_nano_report
from auto_glm.bench.nano_runner import run_nano
from auto_glm.bench.report import format_report
from auto_glm.bench.results import write_report
from auto_glm.bench.runner import CONTENDERS, DEFAULT_CONTENDERS, BenchOptions, run_benchmark
from auto_glm.loader.device import resolve_device

__all__ = ["BENCH_HELP", "configure_bench", "main", "run_bench"]

BENCH_HELP = "measure our engine's output tokens/s against transformers on the same model"
# --quick: a smoke run of a few seconds per contender instead of issue #3's workload.
_QUICK = {"requests": 8, "prompt_lens": (32, 128), "output_lens": (16, 64), "runs": 1}

_EPILOG = """\
The full run (3 runs x 4 contenders on 2 CPU cores) takes about 15 minutes, most of it
sequential transformers generate (~3 minutes per run); --hf-seq-requests 8 cuts that to a
quarter. The benchmark model (~120M parameters, GLM-4 shape, random bf16 weights) is built
once into $AUTOGLM_CACHE/bench-glm4-100m-v1 (default ~/.cache/autoglm) or --model-dir.

--workload nano is nano-vllm's benchmark on a Qwen3-0.6B-shaped model (random bf16 weights,
built once into $AUTOGLM_CACHE/bench-qwen3-0.6b-v1): 256 requests, prompts and outputs of
100-1024 tokens, meant for --device cuda. It prints output tokens/s, the decode step at
batches 1, 64 and 256 against its memory-bandwidth floor, the first request's latency after
the engine starts, and transformers' best (continuous batching or static batches,
--hf-contenders) on the first --hf-requests requests. On the CPU shrink it: --model-dir
TINY_CHECKPOINT --requests 4 --prompt-lens 8 16 --output-lens 4 8 --decode-batches 1 2
--max-num-seqs 4."""


def configure_bench(parser: argparse.ArgumentParser) -> None:
    parser.epilog = _EPILOG
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument(
        "--workload",
        choices=("issue3", "nano"),
        default="issue3",
        help="issue3: issue 3's CPU benchmark (default); nano: nano-vllm's benchmark (issue 13)",
    )
    parser.add_argument(
        "--device",
        default="cpu",
        help="where our engine and transformers run: cpu (default), cuda or cuda:N",
    )
    parser.add_argument(
        "--runs",
        type=int,
        default=None,
        help="timed runs per contender, interleaved (default: 3; 1 with --quick)",
    )
    parser.add_argument(
        "--requests",
        type=int,
        default=None,
        help="requests in the workload (default: 32; 8 with --quick; 256 for nano)",
    )
    parser.add_argument("--seed", type=int, default=0, help="workload seed (default: 0)")
    parser.add_argument(
        "--model-dir",
        default=None,
        help="checkpoint to benchmark; the benchmark model is built there if missing "
        "(default: $AUTOGLM_CACHE/bench-glm4-100m-v1, or bench-qwen3-0.6b-v1 for nano); "
        "an existing checkpoint (a small one for a CPU smoke run) is used as is",
    )
    parser.add_argument(
        "--only",
        action="append",
        choices=CONTENDERS,
        default=None,
        help="run only this contender (repeatable; default: "
        f"{', '.join(DEFAULT_CONTENDERS)}; ours-bf16 and hf-cb-fp32 are like-for-like checks; "
        "ours-int8 and ours-w8a8 quantize the linear weights)",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="small smoke workload: 8 requests, prompts 32-128, outputs 16-64, 1 run",
    )
    parser.add_argument(
        "--prompt-lens",
        type=int,
        nargs=2,
        metavar=("MIN", "MAX"),
        default=None,
        help="prompt length range in tokens (default: 64 512; 100 1024 for nano)",
    )
    parser.add_argument(
        "--output-lens",
        type=int,
        nargs=2,
        metavar=("MIN", "MAX"),
        default=None,
        help="output length range in tokens (default: 64 256; 100 1024 for nano)",
    )
    parser.add_argument(
        "--hf-seq-requests",
        type=int,
        default=None,
        metavar="K",
        help="time sequential transformers generate on the first K requests only (default: all)",
    )
    parser.add_argument(
        "--static-batch-size",
        type=int,
        default=16,
        help="batch size of transformers' static batching (default: 16)",
    )
    parser.add_argument(
        "--hf-contenders",
        nargs="+",
        choices=HF_CONTENDERS,
        default=None,
        metavar="NAME",
        help="nano: the transformers contenders timed, the best compared to ours: cb "
        "(continuous batching sized like our engine), static (generate on batches of "
        "--static-batch-size); default: both",
    )
    parser.add_argument(
        "--max-num-seqs",
        type=int,
        default=None,
        help="concurrent requests, ours and transformers' continuous batching "
        "(default: 32; 256 for nano)",
    )
    parser.add_argument(
        "--max-num-batched-tokens",
        type=int,
        default=None,
        help="tokens per step, ours and transformers' continuous batching "
        "(default: 512; 16384 for nano)",
    )
    parser.add_argument(
        "--kv-cache-mib",
        type=int,
        default=None,
        help="our engine's KV cache size in MiB (default: 256; for nano, half the free "
        "memory, capped at what max-num-seqs full-length requests use)",
    )
    parser.add_argument(
        "--decode-batches",
        type=int,
        nargs="+",
        default=None,
        metavar="N",
        help="nano: batch sizes whose pure-decode step is timed (default: 1 64 256)",
    )
    parser.add_argument(
        "--decode-steps",
        type=int,
        default=None,
        help="nano: engine steps timed per decode batch (default: 32)",
    )
    parser.add_argument(
        "--hf-requests",
        type=int,
        default=None,
        metavar="K",
        help="nano: time transformers on the first K requests only (default: 64; 0: "
        "transformers is not run)",
    )
    parser.add_argument(
        "--attention-backend",
        choices=("auto", "torch", "triton", "flashinfer"),
        default=None,
        help="nano: our engine's attention kernels (default: auto, FlashInfer's on a GPU "
        "where it is installed, else Triton's)",
    )
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default: 2)")
    parser.add_argument(
        "--json",
        type=Path,
        default=None,
        metavar="OUT",
        help="also write the report as JSON to OUT",
    )


# Options that belong to one workload only, refused with the other.
_ISSUE3_ONLY = {"only": "--only", "quick": "--quick", "hf_seq_requests": "--hf-seq-requests"}
_NANO_ONLY = {
    "decode_batches": "--decode-batches",
    "decode_steps": "--decode-steps",
    "hf_requests": "--hf-requests",
    "hf_contenders": "--hf-contenders",
    "attention_backend": "--attention-backend",
}


def _refuse(args: argparse.Namespace, options: dict[str, str], workload: str) -> None:
    given = [flag for name, flag in options.items() if getattr(args, name) not in (None, False)]
    if given:
        other = "nano" if workload == "issue3" else "issue3"
        raise ValueError(
            f"{', '.join(given)}: for --workload {other} only; drop it, or pass --workload {other}"
        )


def _pick(args: argparse.Namespace, name: str, defaults: object, quick: dict | None = None):
    value = getattr(args, name)
    if value is not None:
        return tuple(value) if isinstance(value, list) else value
    return (quick or {}).get(name, getattr(defaults, name))


def _options(args: argparse.Namespace) -> BenchOptions:
    _refuse(args, _NANO_ONLY, "issue3")
    quick = _QUICK if args.quick else {}

    def pick(name: str):
        return _pick(args, name, BenchOptions, quick)

    kv_mib = args.kv_cache_mib
    return BenchOptions(
        runs=pick("runs"),
        requests=pick("requests"),
        seed=args.seed,
        model_dir=args.model_dir,
        only=tuple(args.only or DEFAULT_CONTENDERS),
        prompt_lens=pick("prompt_lens"),
        output_lens=pick("output_lens"),
        hf_seq_requests=args.hf_seq_requests,
        static_batch_size=args.static_batch_size,
        max_num_seqs=pick("max_num_seqs"),
        max_num_batched_tokens=pick("max_num_batched_tokens"),
        kv_cache_memory=BenchOptions.kv_cache_memory if kv_mib is None else kv_mib * 2**20,
        threads=args.threads,
        device=args.device,
    )


def _nano_options(args: argparse.Namespace) -> NanoOptions:
    _refuse(args, _ISSUE3_ONLY, "nano")
    names = (
        "requests",
        "prompt_lens",
        "output_lens",
        "runs",
        "max_num_seqs",
        "max_num_batched_tokens",
        "decode_batches",
        "decode_steps",
        "hf_requests",
        "hf_contenders",
        "attention_backend",
    )
    picked = {name: _pick(args, name, NanoOptions) for name in names}
    return NanoOptions(
        device=args.device,
        seed=args.seed,
        model_dir=args.model_dir,
        kv_cache_memory=None if args.kv_cache_mib is None else args.kv_cache_mib * 2**20,
        static_batch_size=args.static_batch_size,
        threads=args.threads,
        **picked,
    )


def _check_early(args: argparse.Namespace) -> None:
    """Refuse, before minutes of benchmarking, a device this machine lacks and a --json path
    that cannot be written."""
    resolve_device(args.device)
    if args.json is not None:
        folder = Path(args.json).parent
        if not folder.is_dir():
            raise ValueError(
                f"--json {args.json}: its folder {folder} does not exist; create it, or "
                "write the report elsewhere"
            )


def run_bench(args: argparse.Namespace) -> int:
    """Run the benchmark from parsed arguments; print the report; 0 on success."""
    _check_early(args)
    if args.workload == "nano":
        # our engine's figures are written before transformers runs, then the whole report
        on_ours = None if args.json is None else lambda partial: write_report(args.json, partial)
        report = run_nano(_nano_options(args), on_ours=on_ours)
        print(format_nano_report(report))
    else:
        report = run_benchmark(_options(args))
        print(format_report(report))
    if args.json is not None:
        write_report(args.json, report)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="autoglm bench", description=BENCH_HELP)
    configure_bench(parser)
    args = parser.parse_args(argv)
    try:
        return run_bench(args)
    except (ValueError, OSError) as exc:  # bad options, an unloadable or unwritable model dir
        print(f"autoglm bench: error: {exc}", file=sys.stderr)
        return 1
