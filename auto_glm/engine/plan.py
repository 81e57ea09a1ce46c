"""The contract between scheduler and model runner: one step's plan and its result."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from auto_glm.engine.request import Request

__all__ = ["ModelRunnerOutput", "SchedulerOutput"]


@dataclass
class SchedulerOutput:
    """What to run in one step. Lists are parallel, one entry per scheduled request."""

    requests: list[Request]  # [num_reqs]
    num_scheduled_tokens: list[int]  # [num_reqs] tokens each request feeds this step
    start_positions: list[int]  # [num_reqs] num_computed_tokens before this step
    # [num_reqs][num_blocks] block ids of each request when planned: views (outputs.Prefix)
    # of its block_ids, a list that only grows in place until it is replaced
    block_tables: list[Sequence[int]]
    slot_mapping: list[int]  # [total_tokens] cache slot of every fed token, request order
    preempted: list[Request] = field(default_factory=list)  # preempted while scheduling
    # [num_reqs] planned ahead (Scheduler.schedule_ahead): whether the request decodes the
    # token that the step still in flight samples for it, which the host has not read yet;
    # the others feed tokens the host knows. Empty for a step planned in turn.
    pending: list[bool] = field(default_factory=list)

    @property
    def total_tokens(self) -> int:
        return len(self.slot_mapping)

    @property
    def feeds_pending(self) -> bool:
        """Whether any request feeds a token not read back yet (see ``pending``)."""
        return any(self.pending)

    @property
    def is_empty(self) -> bool:
        return not self.requests


@dataclass
class ModelRunnerOutput:
    """Tokens sampled in one step, for the requests whose fed tokens reached their end."""

    request_ids: list[str]  # [num_sampled]
    sampled_token_ids: list[int]  # [num_sampled]
    # per sampled request: (token logprob, [(token id, logprob) of the top-n]) or None
    logprobs: list[tuple[float, list[tuple[int, float]]] | None] = field(default_factory=list)
