"""The engine's unit of work: one sequence and its lifecycle."""

from __future__ import annotations

import enum
import time

from auto_glm.engine.outputs import FinishReason, RequestMetrics
from auto_glm.sampling_params import SamplingParams

__all__ = ["FinishReason", "Request", "RequestStatus"]


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    PREEMPTED = "preempted"  # back in the waiting queue; its KV will be recomputed
    FINISHED = "finished"


class Request:
    """A prompt being decoded.

    ``num_computed_tokens`` counts the leading tokens of ``all_token_ids`` whose K/V are in
    the cache. A step that brings it up to ``len(all_token_ids)`` samples one new token.
    """

    def __init__(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        sampling_params: SamplingParams,
        eos_token_ids: frozenset[int] = frozenset(),
        priority: int = 0,
        cache_salt: str | None = None,
        arrival_time: float | None = None,
        tags: dict | None = None,
        tenant: str | None = None,
        weight: float = 1.0,
    ) -> None:
        if not prompt_token_ids:
            raise ValueError("prompt is empty: give at least one token")
        self.request_id = request_id
        self.prompt_token_ids = list(prompt_token_ids)
        self.sampling_params = sampling_params
        self.eos_token_ids = eos_token_ids
        self.priority = priority  # lower value is served first
        self.cache_salt = cache_salt
        self.tenant = tenant  # whose request: the fair queue policy shares tokens by tenant
        self.weight = weight  # the tenant's share relative to others (fair policy)
        self.arrival_time = time.monotonic() if arrival_time is None else arrival_time
        self.all_token_ids: list[int] = list(prompt_token_ids)
        self.output_token_ids: list[int] = []
        self.num_computed_tokens = 0
        self.num_cached_tokens = 0  # prompt tokens served from the prefix cache at first admission
        self.block_ids: list[int] = []
        self.block_hashes: list[int] = []  # hashes of the leading full blocks, in order
        self.status = RequestStatus.WAITING
        self.finish_reason: FinishReason | None = None
        self.num_preemptions = 0
        self.metrics = RequestMetrics(self.arrival_time)  # stamped by the engine loop
        self.tags = tags or {}  # opaque to the engine: trace context, tenant, route, ...
        self.replica: str | None = None  # the cluster replica that ran it (remote engines)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.all_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def is_finished(self) -> bool:
        return self.status is RequestStatus.FINISHED

    def append_output_token(self, token_id: int) -> None:
        self.output_token_ids.append(token_id)
        self.all_token_ids.append(token_id)

    def __repr__(self) -> str:
        return (
            f"Request({self.request_id!r}, status={self.status.value}, "
            f"computed={self.num_computed_tokens}/{self.num_tokens})"
        )
