"""Runs ``autoglm bench --workload nano``: throughput, decode steps against their floor, and
transformers' best on the same workload, in one run (issue 13).

Order: the copy bandwidth, our engine's start and its first request, the timed workload,
the decode steps at each batch size (replayed from CUDA graphs where the engine captured
them, each planned while the one before runs; then again planned in turn, and eagerly, for
comparison), then (with our engine closed) each transformers contender (continuous batching,
static batches) on the same head of the workload, unless ``--hf-requests 0``; the best of
them is the one ours is compared to.
"""

from __future__ import annotations

import gc
import json
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

from auto_glm.bench.model import checkpoint_architecture, count_parameters
from auto_glm.bench.nano import (
    NANO_MAX_MODEL_LEN,
    NANO_TOKEN_ID_MAX,
    NanoOptions,
    make_nano_workload,
    nano_model_path,
)
from auto_glm.bench.results import RunResult
from auto_glm.bench.workload import Workload

__all__ = ["run_nano"]

_FIRST_RESPONSE_TOKENS = 16


def run_nano(
    options: NanoOptions,
    progress: Callable[[str], None] = lambda line: print(line, file=sys.stderr),
    on_ours: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Run the nano benchmark on ``options.device``; return the report (see nano_report).

    ``on_ours`` gets the report with our engine's figures only (``complete`` False), before
    transformers runs, so that a run stopped during transformers still keeps them."""
    import torch
    import transformers

    from auto_glm.bench.decode import (
        check_decode_room,
        copy_bandwidth,
        first_response,
        measure_decode,
    )
    from auto_glm.bench.machine import device_line
    from auto_glm.bench.ours import OurEngine
    from auto_glm.loader import resolve_device

    wants_cb = options.hf_requests != 0 and "cb" in options.hf_contenders
    if wants_cb and not hasattr(transformers, "ContinuousBatchingConfig"):
        raise ValueError(
            f"--hf-contenders cb: transformers {transformers.__version__} has no continuous "
            "batching (ContinuousBatchingConfig); install transformers>=5 or pass "
            "--hf-contenders static"
        )
    torch.set_num_threads(options.threads)
    device = resolve_device(options.device)
    model_dir = nano_model_path(options.model_dir)
    vocab_size = json.loads((model_dir / "config.json").read_text())["vocab_size"]
    token_id_max = min(NANO_TOKEN_ID_MAX, vocab_size - 1)
    workload = make_nano_workload(
        options.requests, options.seed, token_id_max, options.prompt_lens, options.output_lens
    )
    bandwidth = copy_bandwidth(device)
    progress(f"copy bandwidth: {bandwidth / 1e9:.1f} GB/s (read + written) on {device}")

    start = time.perf_counter()
    ours = OurEngine(
        model_dir,
        options.max_num_seqs,
        options.max_num_batched_tokens,
        options.kv_cache_memory,
        device=str(device),
        max_model_len=NANO_MAX_MODEL_LEN,
        attention_backend=options.attention_backend,
    )
    try:
        engine = ours.model.engine
        started = time.perf_counter() - start
        prompt_len = sum(options.prompt_lens) // 2  # of the requests the decode steps time
        check_decode_room(engine.max_model_len, prompt_len, options.decode_steps)  # refused now
        first_prompt = workload.requests[0]
        first = first_response(
            engine, first_prompt.prompt, min(_FIRST_RESPONSE_TOKENS, first_prompt.output_len)
        )
        progress(
            f"engine start {started:.1f} s; the first request after it: first token in "
            f"{first.first_token_s:.3f} s, {first.output_tokens} tokens in {first.total_s:.3f} s"
        )
        ours_runs = _timed(ours, workload, options.runs, progress)
        dtype_bytes = torch.empty(0, dtype=engine.loaded.dtype).element_size()
        weight_bytes = count_parameters(model_dir) * dtype_bytes

        def decode_rows(engine, label: str) -> list:
            rows = []
            for batch in options.decode_batches:
                step = measure_decode(
                    engine,
                    batch,
                    prompt_len,
                    options.decode_steps,
                    token_id_max,
                    weight_bytes,
                    bandwidth,
                )
                rows.append(step)
                progress(
                    f"decode batch {batch} ({label}): {step.step_s * 1e3:.2f} ms/step, "
                    f"{step.floor_ratio:.2f}x its floor of {step.floor_s * 1e3:.2f} ms"
                )
            return rows

        runner = engine.core.runner
        graphs = runner.decode_graphs is not None and runner.decode_graphs.replay == "graph"
        decode = decode_rows(engine, "CUDA graphs" if graphs else "eager")
        decode_eager, decode_in_turn = [], []
        overlap = engine.core.overlap_steps
        if graphs and overlap:  # each step planned after the last one's tokens are read
            engine.core.overlap_steps = False  # read by the engine's next step
            decode_in_turn = decode_rows(engine, "CUDA graphs, steps in turn")
            engine.core.overlap_steps = True
        if graphs:  # the same steps again without graphs, for comparison
            runner.use_decode_graphs = False  # read by the engine's next step
            decode_eager = decode_rows(engine, "eager")
            runner.use_decode_graphs = True
        engine_info = {
            "max_num_seqs": options.max_num_seqs,
            "max_num_batched_tokens": options.max_num_batched_tokens,
            "kv_cache_bytes": engine.kv_cache_bytes,
            "max_model_len": engine.max_model_len,
            "compute_dtype": str(engine.loaded.dtype).removeprefix("torch."),
            "attention_backend": runner.attention_backend.name,
            "cuda_graphs": graphs,
            "overlap_steps": overlap,
        }
        ours_label = ours.label
    finally:
        ours.close()
    del ours, engine
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()

    report = {
        "workload": {
            "name": "nano",
            "requests": options.requests,
            "seed": options.seed,
            "token_ids": [0, token_id_max],
            "prompt_lens": list(options.prompt_lens),
            "output_lens": list(options.output_lens),
            "prompt_tokens": workload.prompt_tokens,
            "output_tokens": workload.output_tokens,
        },
        "model": {
            "dir": str(model_dir),
            "architecture": checkpoint_architecture(model_dir),
            "parameters": count_parameters(model_dir),
            "dtype": "bfloat16",
            "weight_bytes": weight_bytes,
        },
        "machine": {
            "device": str(device),
            "line": device_line(device),
            "copy_bandwidth": bandwidth,
            "torch_threads": options.threads,
            "torch": torch.__version__,
            "transformers": transformers.__version__,
        },
        "engine": engine_info,
        "runs": options.runs,
        "startup": {
            "engine_start_s": started,
            "first_token_s": first.first_token_s,
            "first_request_s": first.total_s,
            "first_request_tokens": first.output_tokens,
        },
        "ours": _summary("ours", ours_label, ours_runs),
        "decode": [{**asdict(step), "floor_ratio": step.floor_ratio} for step in decode],
        # the same steps without CUDA graphs; empty where the engine captured none
        "decode_eager": [
            {**asdict(step), "floor_ratio": step.floor_ratio} for step in decode_eager
        ],
        # the same steps with graphs, each planned after the last one's tokens are read;
        # empty where the engine plans in turn anyway
        "decode_in_turn": [
            {**asdict(step), "floor_ratio": step.floor_ratio} for step in decode_in_turn
        ],
        "transformers": None,  # the fastest contender; None with --hf-requests 0
        "transformers_contenders": [],  # each one asked for, in --hf-contenders order
        "ratio": None,  # ours / the fastest contender, per output token
        "complete": options.hf_requests == 0,  # False until transformers is timed too
    }
    if options.hf_requests == 0:
        return report
    if on_ours is not None:
        on_ours(report)
    hf_workload = workload.head(options.hf_requests) if options.hf_requests else workload
    for hf in _transformers_contenders(model_dir, str(device), options):
        hf.run(_warmup_workload(token_id_max))
        report["transformers_contenders"].append(
            _summary(hf.name, hf.label, _timed(hf, hf_workload, options.runs, progress))
        )
    best = max(report["transformers_contenders"], key=lambda c: c["median_tokens_per_s"])
    ours_median = report["ours"]["median_tokens_per_s"]
    return report | {
        "transformers": best,
        "ratio": ours_median / best["median_tokens_per_s"],
        "complete": True,
    }


def _timed(contender, workload: Workload, runs: int, progress) -> list[RunResult]:
    results = []
    for index in range(runs):
        result = contender.run(workload)
        results.append(result)
        progress(
            f"run {index + 1}/{runs}: {contender.name}: {result.tokens_per_s:.1f} output "
            f"tokens/s ({result.output_tokens} tokens of {result.num_requests} requests in "
            f"{result.seconds:.1f} s)"
        )
    return results


def _summary(name: str, label: str, runs: list[RunResult]) -> dict[str, Any]:
    return {
        "name": name,
        "label": label,
        "median_tokens_per_s": statistics.median(r.tokens_per_s for r in runs),
        "runs": [
            {
                "seconds": r.seconds,
                "requests": r.num_requests,
                "output_tokens": r.output_tokens,
                "tokens_per_s": r.tokens_per_s,
                # our engine's steps, and those planned while the one before ran
                **(
                    {
                        "steps": r.overhead.steps,
                        "steps_ahead": r.overhead.steps_ahead,
                        "gc_s": r.overhead.gc_time,
                    }
                    if r.overhead is not None
                    else {}
                ),
            }
            for r in runs
        ],
    }


def _warmup_workload(token_id_max: int) -> Workload:
    return make_nano_workload(2, 12345, token_id_max, prompt_lens=(16, 32), output_lens=(4, 8))


def _transformers_contenders(model_dir: Path, device: str, options: NanoOptions) -> list:
    """``options.hf_contenders`` on one loaded model: continuous batching sized like our
    engine, static batches of ``options.static_batch_size``."""
    from auto_glm.bench.hf import HFContinuous, HFStatic, load_hf_model

    model = load_hf_model(model_dir, device=device)
    make = {
        "cb": lambda: HFContinuous(model, options.max_num_seqs, options.max_num_batched_tokens),
        "static": lambda: HFStatic(model, options.static_batch_size),
    }
    return [make[name]() for name in options.hf_contenders]
