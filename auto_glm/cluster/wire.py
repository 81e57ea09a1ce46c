"""What an engine replica streams back to the ingress for one request: small plain dicts.

Each chunk carries what the last engine update added (text, token ids, log probabilities)
and, on the last one, the finish reason and a snapshot of the replica's engine counters, so
the ingress can report every replica's state without polling it. The engine's times of the
request (first scheduled, first token) travel as their ages when the chunk was made: two
processes' monotonic clocks, or two machines', cannot be compared, but a duration can.
A status chunk (:func:`status_chunk`) carries no update: the engine scheduled the request,
or preempted it.
"""

from __future__ import annotations

import time
from dataclasses import asdict
from typing import Any

from auto_glm.engine.core import EngineStats
from auto_glm.engine.inputs import RequestInputError
from auto_glm.engine.outputs import RequestOutput

__all__ = ["chunk_of", "error_chunk", "stats_of", "status_chunk"]


def chunk_of(
    outputs: list[RequestOutput], replica: str, stats: EngineStats | None
) -> dict[str, Any]:
    """One chunk for consecutive updates of one request (their deltas joined)."""
    last = outputs[-1]
    delta = [t for o in outputs for t in o.outputs.delta_token_ids]
    m, now = last.metrics, time.monotonic()
    return {
        "replica": replica,
        "text": "".join(o.outputs.delta_text for o in outputs),
        "token_ids": delta,
        "logprobs": list(last.outputs.logprobs[-len(delta) :]) if delta else [],
        "finish_reason": last.outputs.finish_reason,
        "stop_reason": last.outputs.stop_reason,
        "num_cached_tokens": last.num_cached_tokens,
        "stats": None if stats is None else asdict(stats),
        "scheduled_ago": _age(now, m and m.first_scheduled_time),
        "first_token_ago": _age(now, m and m.first_token_time),
        "num_preemptions": m.num_preemptions if m else 0,
    }


def _age(now: float, stamp: float | None) -> float | None:
    return None if stamp is None else now - stamp


def error_chunk(replica: str, error: BaseException) -> dict[str, Any]:
    """The engine failed the request: ``invalid`` when the request itself was at fault
    (refused, or ended for its input: then ``code`` names it)."""
    return {
        "replica": replica,
        "error": str(error),
        "invalid": isinstance(error, ValueError),
        "code": error.code if isinstance(error, RequestInputError) else None,
    }


def status_chunk(replica: str, status: str) -> dict[str, Any]:
    """The engine changed the request's status (``running``, ``preempted``): no update."""
    return {"replica": replica, "status": status}


def stats_of(chunk: dict[str, Any]) -> EngineStats | None:
    return None if chunk.get("stats") is None else EngineStats(**chunk["stats"])
