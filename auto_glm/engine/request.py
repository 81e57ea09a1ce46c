"""The engine's unit of work: one sequence and its lifecycle."""

from __future__ import annotations

import enum
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Protocol

import torch

from auto_glm.engine.inputs import ImageFeatures
from auto_glm.engine.outputs import FinishReason, RequestMetrics
from auto_glm.sampling_params import SamplingParams

if TYPE_CHECKING:
    from opentelemetry.context import Context

    from auto_glm.engine.structured import Grammar

__all__ = ["Caller", "FinishReason", "Request", "RequestStatus"]


class Caller(Protocol):
    """The API call (an HTTP or gRPC exchange) that submitted a request.

    The engine does not read it: its finish listeners report each request's tokens to it,
    and log and trace the request under the call's id and trace.
    """

    request_id: str  # the call's id, as its response headers and access log line give it
    otel_context: Context  # the call's trace: the engine's spans are its children

    def engine_request_finished(
        self, tokens_in: int, tokens_out: int, ttft: float | None
    ) -> None: ...


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    PREEMPTED = "preempted"  # back in the waiting queue; its KV will be recomputed
    FINISHED = "finished"


class Request:
    """A prompt being decoded.

    ``num_computed_tokens`` counts the leading tokens of ``all_token_ids`` whose K/V are in
    the cache. A step that brings it up to ``len(all_token_ids)`` samples one new token.

    ``images`` are the prompt's images, in order; ``image_offsets`` the index of each one's
    first placeholder token (it has ``num_tokens`` of them in a row).
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
        caller: Caller | None = None,
        tenant: str | None = None,
        weight: float = 1.0,
        grammar: Grammar | None = None,
        images: Sequence[ImageFeatures] = (),
        image_offsets: Sequence[int] = (),
    ) -> None:
        if not prompt_token_ids:
            raise ValueError("prompt is empty: give at least one token")
        if len(images) != len(image_offsets) or any(
            not 0 <= o <= len(prompt_token_ids) - im.num_tokens
            for o, im in zip(image_offsets, images, strict=True)
        ):
            raise ValueError(
                f"{len(images)} image(s) at offsets {list(image_offsets)} do not fit a prompt "
                f"of {len(prompt_token_ids)} tokens; build them with EngineClient.prepare()"
            )
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
        self.caller = caller  # the API call that submitted it, for the finish listeners
        self.replica: str | None = None  # the cluster replica that ran it (remote engines)
        self.grammar = grammar  # structured output: follows the output tokens, or None
        self.error: str | None = None  # why the engine failed it, when it did
        self.error_code: str | None = None  # set when the request's input was at fault
        self.images: tuple[ImageFeatures, ...] = tuple(images)
        self.image_offsets: tuple[int, ...] = tuple(image_offsets)
        # image index -> its encoded tokens [num_tokens, D], kept from the first prefill
        # chunk that reaches the image until the chunk that passes its end
        self.image_embeds: dict[int, torch.Tensor] = {}
        # M-RoPE rows of the prompt [3, num_prompt_tokens], computed once by the model runner
        # of a multimodal model, with the rotary position of every later token less its
        # index: M-RoPE's decode offset (at most 0), which a decode step adds to the index
        self.mrope: torch.Tensor | None = None
        self.rope_offset = 0

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
