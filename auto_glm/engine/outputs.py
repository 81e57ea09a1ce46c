"""What the engine reports: per-step deltas from the loop, per-request results to callers."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

__all__ = [
    "CompletionOutput",
    "EngineCoreOutput",
    "FinishReason",
    "RequestMetrics",
    "RequestOutput",
    "TokenLogprob",
]


class FinishReason(str, enum.Enum):
    STOP = "stop"  # EOS, a stop token id, or (set by the output processor) a stop string
    LENGTH = "length"  # max_tokens or max_model_len reached
    ABORT = "abort"  # cancelled (caller, disconnect, timeout), or failed by the engine


# (logprob of the chosen token, [(token id, logprob) of the top-n alternatives])
TokenLogprob = tuple[float, list[tuple[int, float]]]


@dataclass
class RequestMetrics:
    """Monotonic timestamps (seconds) of one request's life."""

    arrival_time: float
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    finished_time: float | None = None
    num_preemptions: int = 0


@dataclass
class EngineCoreOutput:
    """New tokens of one request after one step, sent from the loop thread."""

    request_id: str
    new_token_ids: list[int]
    new_logprobs: list[TokenLogprob | None]
    finish_reason: FinishReason | None = None
    error: str | None = None  # set when the engine failed the request


@dataclass
class CompletionOutput:
    text: str  # everything generated so far (stop string excluded)
    token_ids: list[int]
    delta_text: str  # what this update added
    delta_token_ids: list[int]
    finish_reason: str | None = None  # "stop" | "length" | "abort"
    logprobs: list[TokenLogprob | None] = field(default_factory=list)  # one per token_ids entry
    stop_reason: str | int | None = None  # the stop string or token id that matched


@dataclass
class RequestOutput:
    """One update of a request, as the Python API and the server see it."""

    request_id: str
    prompt_token_ids: list[int]
    outputs: CompletionOutput
    finished: bool
    num_cached_tokens: int = 0
    metrics: RequestMetrics | None = None
