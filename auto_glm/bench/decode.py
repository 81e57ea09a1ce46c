"""Our engine's decode step and its memory-bandwidth floor, through the engine's public client.

A decode step reads every weight once and the K/V of every context token of the batch, so
its floor is ``(weight bytes + KV bytes read) / copy bandwidth``. The copy bandwidth is a
large device-to-device tensor copy timed at the start (bytes read plus bytes written per
second, the way a copy moves them).
"""

from __future__ import annotations

import functools
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from auto_glm.engine.client import EngineClient
from auto_glm.engine.core import EngineDeadError, EngineStats
from auto_glm.engine.heap import gc_pause_seconds
from auto_glm.engine.outputs import RequestOutput
from auto_glm.sampling_params import SamplingParams

__all__ = [
    "DecodeStep",
    "FirstResponse",
    "check_decode_room",
    "copy_bandwidth",
    "first_response",
    "measure_decode",
]

_COPY_BYTES = {"cuda": 2 * 2**30, "cpu": 256 * 2**20}
_COPY_REPEATS = 10
# Stats polling interval while timing decode steps: short against a window of steps, long
# enough that the polling thread barely competes with the engine's thread for the GIL.
_POLL_S = 0.002


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def copy_bandwidth(device: torch.device) -> float:
    """Bytes moved (read + written) per second by the fastest of a few large tensor copies:
    2 GiB on a GPU, 256 MiB (well past the caches) on the CPU, of random bytes (constant data
    can run faster than real data does)."""
    size = _COPY_BYTES[device.type]
    gen = torch.Generator(device=device).manual_seed(0)
    src = torch.randint(0, 256, (size,), generator=gen, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)  # first touch and allocator growth, untimed
    best = float("inf")
    for _ in range(_COPY_REPEATS):
        _sync(device)
        start = time.perf_counter()
        dst.copy_(src)
        _sync(device)
        best = min(best, time.perf_counter() - start)
    del src, dst
    if device.type == "cuda":
        torch.cuda.empty_cache()  # the KV cache is sized from free memory next
    return 2 * size / best


@dataclass(frozen=True)
class FirstResponse:
    """The first request after the engine started: time to its first token and to its end."""

    first_token_s: float
    total_s: float
    output_tokens: int


def first_response(engine: EngineClient, prompt: list[int], max_tokens: int) -> FirstResponse:
    """Time one request on an engine that has run nothing yet (one-off costs included)."""
    done = threading.Event()
    marks: list[float] = []
    final: list[RequestOutput | BaseException] = []

    def sink(item: RequestOutput | BaseException) -> None:
        if isinstance(item, BaseException) or item.finished:
            final.append(item)
            done.set()
        if not marks and not isinstance(item, BaseException) and item.outputs.token_ids:
            marks.append(time.perf_counter())

    params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
    start = time.perf_counter()
    engine.submit(prompt, params, sink, cache_salt="bench-first-response")
    done.wait()
    (item,) = final
    if isinstance(item, BaseException):
        raise item
    return FirstResponse(marks[0] - start, time.perf_counter() - start, len(item.outputs.token_ids))


@dataclass(frozen=True)
class DecodeStep:
    """``batch`` requests in pure decode, timed over ``steps`` engine steps.

    ``step_s`` is wall time per step (the loop's whole cycle); ``engine_step_s`` the
    engine's own per-step counter (scheduling, forward, sampling); ``model_s`` the part in
    the model runner (inputs, forward, sampling), ``forward_s`` the part inside the model's
    forward (device time on a GPU); ``wait_s`` the loop's wait for the sampled tokens (on a
    GPU: ``step_s - wait_s`` is the loop's host time per step); ``output_s`` the output
    thread's CPU time per step (detokenizing, stop strings, handing the updates over), which
    takes the same GIL as the loop; ``gc_s`` the time per step that garbage collections held
    the process (see :mod:`auto_glm.engine.heap`). ``context_tokens`` is
    the batch's mean total context over the window, whose K/V each step reads.
    """

    batch: int
    steps: int
    step_s: float
    engine_step_s: float
    model_s: float
    forward_s: float
    wait_s: float
    output_s: float
    gc_s: float
    context_tokens: float
    kv_bytes: float
    weight_bytes: int
    floor_s: float

    @property
    def floor_ratio(self) -> float:
        """How many times its memory-bandwidth floor the step takes (1.0 is the floor)."""
        return self.step_s / self.floor_s


def check_decode_room(max_model_len: int, prompt_len: int, steps: int) -> int:
    """The output tokens that ``max_model_len`` leaves a request of ``prompt_len`` tokens;
    raises ValueError if that cannot cover ``steps`` timed decode steps."""
    room = max_model_len - prompt_len
    if room < steps + 2:
        raise ValueError(
            f"timing {steps} decode steps needs requests that make at least {steps + 2} "
            f"tokens after their {prompt_len}-token prompt, but max_model_len "
            f"({max_model_len}) leaves {room}; lower --decode-steps or --prompt-lens"
        )
    return room


def measure_decode(
    engine: EngineClient,
    batch: int,
    prompt_len: int,
    steps: int,
    token_id_max: int,
    weight_bytes: int,
    bandwidth: float,
) -> DecodeStep:
    """Put ``batch`` requests of ``prompt_len`` random tokens into decode, then time ``steps``
    engine steps in which all of them decode and nothing else runs; abort them after."""
    room = check_decode_room(engine.max_model_len, prompt_len, steps)
    _wait_idle(engine)  # aborted requests of an earlier measurement may still be leaving
    rng = random.Random(batch)
    counts: dict[str, int] = {}
    ended: list[RequestOutput | BaseException] = []  # errors, and requests that finished
    ready = threading.Event()

    def sink(item: RequestOutput | BaseException) -> None:
        if isinstance(item, BaseException) or item.finished:
            ended.append(item)
            ready.set()
        if isinstance(item, BaseException):
            return
        counts[item.request_id] = len(item.outputs.token_ids)
        if len(counts) == batch:
            ready.set()

    # Long enough to still be decoding after the last prefill (at worst one prompt per step,
    # else as many steps as the prompts fill at max_num_batched_tokens) and the timed steps,
    # where max_model_len leaves room: a request that ends early stops the measurement.
    prefill_steps = -(-batch * prompt_len // engine.config.max_num_batched_tokens) + batch
    max_tokens = min(prefill_steps + 2 * steps + 8, room)
    params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
    ids = [
        engine.submit(
            [rng.randint(0, token_id_max) for _ in range(prompt_len)],
            params,
            sink,
            cache_salt=f"bench-decode-{batch}",
        ).request_id
        for _ in range(batch)
    ]
    try:
        ready.wait()
        check = functools.partial(_check_running, ended, steps, max_tokens)
        check(0)
        first, first_t = _next_step(engine, check)
        first_output, first_gc = engine.output_time, gc_pause_seconds()
        first_tokens = sum(counts.values())
        if first.num_running != batch or first.num_waiting:
            raise ValueError(
                f"only {first.num_running} of {batch} decode requests ran at once; raise "
                "--kv-cache-mib (or, with --device cuda, leave it unset) or --max-num-seqs"
            )
        last, last_t = first, first_t
        while last.num_steps < first.num_steps + steps:
            time.sleep(_POLL_S)
            last, last_t = engine.stats(), time.perf_counter()
            check(last.num_steps - first.num_steps)
        last_output, last_gc = engine.output_time, gc_pause_seconds()
        last_tokens = sum(counts.values())
    finally:
        for request_id in ids:
            engine.abort(request_id)
    done = last.num_steps - first.num_steps
    context = batch * prompt_len + (first_tokens + last_tokens) / 2
    kv_bytes = context * engine.kv_cache_bytes / (engine.num_blocks * engine.config.block_size)
    return DecodeStep(
        batch=batch,
        steps=done,
        step_s=(last_t - first_t) / done,
        engine_step_s=(last.step_time - first.step_time) / done,
        model_s=(last.model_time - first.model_time) / done,
        forward_s=(last.forward_time - first.forward_time) / done,
        wait_s=(last.wait_time - first.wait_time) / done,
        output_s=(last_output - first_output) / done,
        gc_s=(last_gc - first_gc) / done,
        context_tokens=context / batch,
        kv_bytes=kv_bytes,
        weight_bytes=weight_bytes,
        floor_s=(weight_bytes + kv_bytes) / bandwidth,
    )


def _check_running(
    ended: list[RequestOutput | BaseException], steps: int, max_tokens: int, done: int
) -> None:
    """Raise if a decode request ended before the window's ``steps`` steps were timed
    (``done`` of them were): its error, or ValueError (the options left it too few tokens)."""
    if not ended:
        return
    item = ended[0]
    if isinstance(item, BaseException):
        raise item
    raise ValueError(
        f"a decode request ended ({item.outputs.finish_reason}, {max_tokens} tokens at "
        f"most) after {done} of the {steps} timed steps: every request must decode through "
        "the window; lower --decode-steps, or --prompt-lens for more room in max_model_len"
    )


def _next_step(engine: EngineClient, check: Callable[[int], None]) -> tuple[EngineStats, float]:
    """The engine's counters just after its next step ends, and the time they were read;
    ``check(0)`` raises while waiting if the measurement's requests ended."""
    start = engine.stats().num_steps
    while True:
        stats, now = engine.stats(), time.perf_counter()
        if stats.num_steps > start:
            return stats, now
        check(0)
        time.sleep(_POLL_S)


def _wait_idle(engine: EngineClient) -> None:
    while (stats := engine.stats()).num_running or stats.num_waiting:
        if not engine.is_alive:  # its requests would never leave
            raise EngineDeadError(engine.core.death_message)
        time.sleep(_POLL_S)
