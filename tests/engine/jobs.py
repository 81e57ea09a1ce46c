"""Submitting requests to a model's engine all at once and waiting for each to end: the
helper the engine tests share. It imports the engine only, not the server, so that the
CUDA-only tests that use it load on the GPU machine's image (benchmarks/gpu_check.sh)."""

from __future__ import annotations

import contextlib
import queue
from collections.abc import Sequence
from typing import Any

from auto_glm import GLMModel, SamplingParams
from auto_glm.engine.outputs import RequestOutput
from auto_glm.engine.request import Request

__all__ = ["finals", "run_together"]

Job = tuple[Any, SamplingParams]  # an engine input (token ids, or a prompt with images)


def run_together(
    model: GLMModel, jobs: Sequence[Job], *, hold: bool = False, timeout: float = 120.0
) -> tuple[list[RequestOutput | BaseException], list[Request]]:
    """Submit every job; each one's final output or the error that ended it, in job order,
    and its engine request. With ``hold`` all are in before the loop runs a step (it waits
    on the core's lock), so the first step batches them all."""
    done: queue.Queue[tuple[int, RequestOutput | BaseException]] = queue.Queue()
    engine = model.engine
    requests = []
    with engine.core._wake if hold else contextlib.nullcontext():
        for i, (item, params) in enumerate(jobs):

            def sink(out: RequestOutput | BaseException, i: int = i) -> None:
                if isinstance(out, BaseException) or out.finished:
                    done.put((i, out))

            requests.append(engine.submit(item, params, sink))
    results = dict(done.get(timeout=timeout) for _ in jobs)
    return [results[i] for i in range(len(jobs))], requests


def finals(
    model: GLMModel, jobs: Sequence[Job], *, hold: bool = False, timeout: float = 120.0
) -> list[RequestOutput]:
    """:func:`run_together`'s final outputs; the first error, if any, is raised."""
    outputs = []
    for result in run_together(model, jobs, hold=hold, timeout=timeout)[0]:
        if isinstance(result, BaseException):
            raise result
        outputs.append(result)
    return outputs
