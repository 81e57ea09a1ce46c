"""Runs the benchmark: builds the workload and contenders, times them round-robin, reports."""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from auto_glm.bench.model import (
    bench_model_path,
    checkpoint_architecture,
    count_parameters,
    prompt_vocab,
)
from auto_glm.bench.report import summarise
from auto_glm.bench.results import RunResult
from auto_glm.bench.workload import Workload, make_workload
from auto_glm.engine.threads import on_own_thread

__all__ = ["CONTENDERS", "DEFAULT_CONTENDERS", "BenchOptions", "Contender", "run_benchmark"]

# Round-robin order within each run. "ours" runs at its default precision (bf16 weights,
# float32 arithmetic on CPUs without native bf16); "ours-bf16" and "hf-cb-fp32" are the
# like-for-like checks: our engine with bf16 arithmetic, and transformers' continuous
# batching with the same float32 arithmetic as ours. "ours-int8" and "ours-w8a8" are our
# engine with INT8 linear weights (issue 14).
CONTENDERS = (
    "ours",
    "ours-bf16",
    "ours-int8",
    "ours-w8a8",
    "hf-seq",
    "hf-static",
    "hf-cb",
    "hf-cb-fp32",
)
DEFAULT_CONTENDERS = ("ours", "hf-seq", "hf-static", "hf-cb")


class Contender(Protocol):
    name: str
    label: str

    def run(self, workload: Workload) -> RunResult: ...


@dataclass(frozen=True)
class BenchOptions:
    runs: int = 3
    requests: int = 32
    seed: int = 0
    model_dir: str | None = None
    only: tuple[str, ...] = DEFAULT_CONTENDERS
    prompt_lens: tuple[int, int] = (64, 512)
    output_lens: tuple[int, int] = (64, 256)
    hf_seq_requests: int | None = None  # time sequential generate on the first K requests only
    static_batch_size: int = 16
    max_num_seqs: int = 32
    max_num_batched_tokens: int = 512
    kv_cache_memory: int = 256 * 2**20  # bytes; ~43k tokens of this model's KV, 3x the workload
    threads: int = 2
    device: str = "cpu"  # ours and transformers alike

    def __post_init__(self) -> None:
        unknown = [name for name in self.only if name not in CONTENDERS]
        checks = [
            (self.runs >= 1, "runs", "must be >= 1"),
            (not unknown and self.only, "only", f"must name some of {', '.join(CONTENDERS)}"),
            (
                self.hf_seq_requests is None or self.hf_seq_requests >= 1,
                "hf_seq_requests",
                "must be >= 1",
            ),
            (self.static_batch_size >= 1, "static_batch_size", "must be >= 1"),
            (self.threads >= 1, "threads", "must be >= 1"),
        ]
        for ok, name, rule in checks:
            if not ok:
                raise ValueError(f"{name}={getattr(self, name)!r} is invalid: it {rule}")


def _warmup_workload(vocab: list[int]) -> Workload:
    # first calls pay one-off costs (kernel selection, allocator growth) no contender should time
    return make_workload(2, seed=12345, vocab=vocab, prompt_lens=(16, 32), output_lens=(4, 8))


def run_benchmark(
    options: BenchOptions,
    progress: Callable[[str], None] = lambda line: print(line, file=sys.stderr),
) -> dict[str, Any]:
    """Time every selected contender ``options.runs`` times, interleaved; return the report."""
    import torch
    import transformers

    torch.set_num_threads(options.threads)
    # torch work runs on threads that end with it, one at a time (auto_glm.engine.threads):
    # an OpenMP team left behind would slow every contender timed after it
    model_dir = on_own_thread(bench_model_path, options.model_dir)
    vocab = prompt_vocab(model_dir)
    workload = make_workload(
        options.requests, options.seed, vocab, options.prompt_lens, options.output_lens
    )
    contenders = on_own_thread(_build, options, model_dir)

    def run(contender: Contender, work: Workload) -> RunResult:
        result = on_own_thread(contender.run, work)
        release = getattr(contender, "release", None)
        if release is not None and options.device == "cpu":
            release()  # its engine thread and OpenMP team end until its next run
        return result

    try:
        for contender in contenders:
            run(contender, _warmup_workload(vocab))
        runs: dict[str, list[RunResult]] = {c.name: [] for c in contenders}
        for index in range(options.runs):
            for contender in contenders:
                result = run(contender, workload)
                runs[contender.name].append(result)
                progress(
                    f"run {index + 1}/{options.runs}: {contender.name}: "
                    f"{result.tokens_per_s:.1f} output tokens/s "
                    f"({result.output_tokens} tokens in {result.seconds:.1f} s)"
                )
    finally:
        for contender in contenders:
            close = getattr(contender, "close", None)
            if close is not None:
                close()
    header = {
        "model": {
            "dir": str(model_dir),
            "architecture": checkpoint_architecture(model_dir),
            "parameters": count_parameters(model_dir),
            "dtype": "bfloat16",
        },
        "machine": {
            "device": options.device,
            "torch_threads": options.threads,
            "torch": torch.__version__,
            "transformers": transformers.__version__,
        },
        "workload": {
            "requests": options.requests,
            "seed": options.seed,
            "prompt_lens": list(options.prompt_lens),
            "output_lens": list(options.output_lens),
            "prompt_tokens": workload.prompt_tokens,
            "output_tokens": workload.output_tokens,
        },
        "engine": {
            "max_num_seqs": options.max_num_seqs,
            "max_num_batched_tokens": options.max_num_batched_tokens,
            "kv_cache_memory": options.kv_cache_memory,
        },
        "runs": options.runs,
    }
    return summarise(header, {c.name: c.label for c in contenders}, runs)


def _build(options: BenchOptions, model_dir: Path) -> list[Contender]:
    import torch

    from auto_glm.bench.hf import HFContinuous, HFSequential, HFStatic, load_hf_model
    from auto_glm.bench.ours import OurEngine

    wants_bf16 = any(n in options.only for n in ("hf-seq", "hf-static", "hf-cb"))
    hf_model = load_hf_model(model_dir, device=options.device) if wants_bf16 else None
    seq_requests = options.hf_seq_requests
    if seq_requests is not None and seq_requests >= options.requests:
        seq_requests = None  # the whole workload: no "first K only" caveat to print

    def ours(**variant) -> Callable[[], Contender]:
        return lambda: OurEngine(
            model_dir,
            options.max_num_seqs,
            options.max_num_batched_tokens,
            options.kv_cache_memory,
            device=options.device,
            **variant,
        )

    makers: dict[str, Callable[[], Contender]] = {
        "ours": ours(),
        "ours-bf16": ours(compute_dtype="bfloat16"),
        "ours-int8": ours(quantization="int8"),
        "ours-w8a8": ours(quantization="w8a8"),
        "hf-seq": lambda: HFSequential(hf_model, seq_requests),
        "hf-static": lambda: HFStatic(hf_model, options.static_batch_size),
        "hf-cb": lambda: HFContinuous(
            hf_model, options.max_num_seqs, options.max_num_batched_tokens
        ),
        "hf-cb-fp32": lambda: HFContinuous(
            load_hf_model(model_dir, torch.float32, options.device),
            options.max_num_seqs,
            options.max_num_batched_tokens,
            name="hf-cb-fp32",
        ),
    }
    return [makers[name]() for name in CONTENDERS if name in options.only]
