"""Our engine as a benchmark contender: every request submitted at once, each with its length.

On the CPU a contender :meth:`OurEngine.release` s its engine between runs, so that its
engine thread, and with it its OpenMP team, is gone while another contender runs: with more
OpenMP threads alive than CPUs, libgomp makes every parallel region wait for a sleeping
worker (see :mod:`auto_glm.engine.threads`), which would slow whichever contender runs
beside idle ones.
"""

from __future__ import annotations

import itertools
import queue
import time
from collections.abc import Callable
from pathlib import Path

from auto_glm.bench.results import EngineOverhead, RunResult
from auto_glm.bench.workload import Workload
from auto_glm.engine.core import EngineStats
from auto_glm.engine.heap import gc_pause_seconds
from auto_glm.engine.outputs import RequestOutput
from auto_glm.sampling_params import SamplingParams

__all__ = ["OurEngine"]

_POLL_S = 0.02  # how often the engine's counters are sampled to find the full-batch window
_MIN_WINDOW_STEPS = 4  # fewer full-batch steps than this give no meaningful share


class OurEngine:
    """Our engine through its client: per-request ``max_tokens`` with ``ignore_eos``."""

    name = "ours"

    def __init__(
        self,
        model_dir: Path,
        max_num_seqs: int,
        max_num_batched_tokens: int,
        kv_cache_memory: int | None,
        compute_dtype: str | None = None,
        quantization: str = "none",
        dtype: str = "bfloat16",
        quantize_lm_head: bool = False,
        kv_cache_dtype: str = "auto",
        device: str = "cpu",
        kv_cache_scales: str = "dynamic",
        max_model_len: int | None = None,
        attention_backend: str = "auto",
    ) -> None:
        from auto_glm.api import GLMModel
        from auto_glm.bench.model import prompt_vocab
        from auto_glm.bench.workload import make_workload

        self.max_num_seqs = max_num_seqs
        self._build = lambda: GLMModel(
            str(model_dir),
            device=device,
            dtype=dtype,
            compute_dtype=compute_dtype,
            quantization=quantization,
            quantize_lm_head=quantize_lm_head,
            max_num_seqs=max_num_seqs,
            max_num_batched_tokens=max_num_batched_tokens,
            kv_cache_memory=kv_cache_memory,
            kv_cache_dtype=kv_cache_dtype,
            kv_cache_scales=kv_cache_scales,
            max_model_len=max_model_len,
            attention_backend=attention_backend,
        )
        # what a rebuilt engine runs before it is timed: first calls pay one-off costs
        self._warmup = make_workload(2, 12345, prompt_vocab(model_dir), (16, 32), (4, 8))
        self.model: GLMModel | None = self._build()
        if compute_dtype is not None:
            self.name = "ours-bf16"
        weights = "bf16 weights"
        if dtype != "bfloat16":  # the bf16 checkpoint's values, held in another dtype
            self.name, weights = f"ours-{dtype}", f"{dtype} weights"
        if quantization != "none":
            self.name, weights = f"ours-{quantization}", f"{quantization} linear weights"
            if quantize_lm_head:
                self.name, weights = f"{self.name}-head", f"{weights} and lm_head"
        if kv_cache_dtype != "auto":
            static = "" if kv_cache_scales == "dynamic" else f" ({kv_cache_scales} scales)"
            self.name = f"{self.name}-kv-{kv_cache_dtype}"
            weights = f"{weights}, {kv_cache_dtype} KV cache{static}"
        loaded = self.model.engine.loaded
        math = str(loaded.dtype).removeprefix("torch.")
        where = "" if loaded.device.type == "cpu" else f", on {loaded.device}"
        self.label = (
            f"autoglm engine (max_num_seqs={max_num_seqs}, "
            f"max_num_batched_tokens={max_num_batched_tokens}, {weights}, {math} math{where})"
        )
        # Each run salts the prefix cache differently: repeating the workload must not turn
        # the next run's prefills into cache hits that the other contenders never get.
        self._salts = itertools.count()

    def release(self) -> None:
        """Close the engine until the next :meth:`run`, which builds and warms up a new one."""
        if self.model is not None:
            self.model.close()
            self.model = None

    def run(self, workload: Workload) -> RunResult:
        if self.model is None:
            self.model = self._build()
            self._timed_run(self._warmup)
        return self._timed_run(workload)

    def _timed_run(self, workload: Workload) -> RunResult:
        assert self.model is not None
        engine = self.model.engine
        salt = f"bench-run-{next(self._salts)}"
        done: queue.SimpleQueue[RequestOutput | BaseException] = queue.SimpleQueue()

        def sink(item: RequestOutput | BaseException) -> None:
            if isinstance(item, BaseException) or item.finished:
                done.put(item)

        before, gc_before = engine.stats(), gc_pause_seconds()
        window = _FullBatchWindow(min(self.max_num_seqs, len(workload.requests)), before)
        start = time.perf_counter()
        wanted = {}
        for request in workload.requests:
            params = SamplingParams(max_tokens=request.output_len, temperature=0, ignore_eos=True)
            submitted = engine.submit(request.prompt, params, sink, cache_salt=salt)
            wanted[submitted.request_id] = request.output_len
        produced = 0
        for _ in workload.requests:
            item = _next_final(done, lambda: window.poll(engine.stats()))
            if isinstance(item, BaseException):
                raise item
            got, want = len(item.outputs.token_ids), wanted[item.request_id]
            if got != want:
                raise RuntimeError(
                    f"our engine produced {got} tokens for a request of {want} with "
                    f"ignore_eos (finish: {item.outputs.finish_reason})"
                )
            produced += got
        seconds = time.perf_counter() - start
        overhead = _overhead(before, engine.stats(), window, gc_pause_seconds() - gc_before)
        return RunResult(seconds, len(workload.requests), produced, overhead)

    def close(self) -> None:
        self.release()


def _next_final(done: queue.SimpleQueue, poll: Callable[[], None]) -> RequestOutput | BaseException:
    while True:
        poll()
        try:
            return done.get(timeout=_POLL_S)
        except queue.Empty:
            continue


class _FullBatchWindow:
    """First and last consistent engine counters seen while ``full`` requests were running.

    The loop adds a step's forward time before its step time, so a sample taken between the
    two counts a forward without its step, which would shift the window's share by a whole
    forward. Outside that gap the cumulative overhead (step minus forward time) never
    decreases, while inside it drops by about one forward: such samples are skipped.
    """

    def __init__(self, full: int, start: EngineStats) -> None:
        self.full = full
        self.first: EngineStats | None = None
        self.last: EngineStats | None = None
        self._overhead = start.step_time - start.forward_time

    def poll(self, stats: EngineStats) -> None:
        overhead = stats.step_time - stats.forward_time
        if overhead < self._overhead:
            return
        self._overhead = overhead
        if stats.num_running >= self.full:
            self.first = self.first or stats
            self.last = stats


def _overhead(
    before: EngineStats, after: EngineStats, window: _FullBatchWindow, gc_time: float
) -> EngineOverhead:
    step = after.step_time - before.step_time
    forward = after.forward_time - before.forward_time
    full_steps, full_share = 0, None
    if window.first is not None and window.last is not None:
        full_steps = window.last.num_steps - window.first.num_steps
        full_step = window.last.step_time - window.first.step_time
        full_forward = window.last.forward_time - window.first.forward_time
        if full_steps >= _MIN_WINDOW_STEPS and full_step > 0:
            full_share = 1 - full_forward / full_step
    return EngineOverhead(
        steps=after.num_steps - before.num_steps,
        steps_ahead=after.num_steps_ahead - before.num_steps_ahead,
        step_time=step,
        forward_time=forward,
        share=1 - forward / step if step > 0 else 0.0,
        full_batch_steps=full_steps,
        full_batch_share=full_share,
        prefix_cache_hits=after.prefix_cache_hits - before.prefix_cache_hits,
        gc_time=gc_time,
    )
