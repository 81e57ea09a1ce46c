"""Admission control and the server's life cycle: who gets in, who is still running.

Requests beyond the engine's batch slots wait in the engine's queue; at most
``max_queued_requests`` of them may wait, the rest are refused with 429 at once so a
client can back off instead of timing out. Draining (after SIGTERM/SIGINT) refuses new
work with 503 while what was accepted runs to completion.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from auto_glm.engine.client import EngineClient
from auto_glm.sampling_params import SamplingParams
from auto_glm.serving.errors import APIError
from auto_glm.serving.generation import Generation

__all__ = ["Admission"]

log = logging.getLogger("auto_glm.serving")
RETRY_AFTER_S = 1  # the queue moves every engine step, so a short back-off is enough


class Admission:
    def __init__(
        self, client: EngineClient, max_queued_requests: int, request_timeout: float
    ) -> None:
        self.client = client
        self.max_queued_requests = max_queued_requests
        self.request_timeout = request_timeout
        self.draining = False
        self.active: set[Generation] = set()

    @property
    def num_waiting(self) -> int:
        return sum(g.num_waiting for g in self.active)

    @property
    def num_in_flight(self) -> int:
        """API calls accepted and not yet answered in full."""
        return len(self.active)

    def start(
        self,
        request_id: str,
        work: Sequence[tuple[str | list[int], SamplingParams]],
        tags: dict | None = None,
    ) -> Generation:
        """Admit one API call and submit its engine requests, or raise APIError (503 draining
        or engine dead, 429 queue full, 400 bad input). Nothing is left queued on failure."""
        if self.draining:
            raise APIError(
                503,
                "the server is shutting down and accepts no new requests; "
                "retry against another replica",
                code="draining",
            )
        if not self.client.is_alive:
            raise APIError(
                503, "the engine loop has stopped; restart the server", code="engine_dead"
            )
        waiting = self.num_waiting
        # An empty queue takes any call, so an n larger than the queue is not refused forever.
        if waiting and waiting + len(work) > self.max_queued_requests:
            raise APIError(
                429,
                f"the server is busy: {waiting} requests are already waiting "
                f"(max_queued_requests={self.max_queued_requests}); retry after "
                f"{RETRY_AFTER_S} s",
                code="queue_full",
                headers={"Retry-After": str(RETRY_AFTER_S)},
            )
        generation = Generation(
            self.client, request_id, self.request_timeout, self.active.discard, tags
        )
        self.active.add(generation)
        try:
            for prompt, params in work:
                generation.submit(prompt, params)
        except ValueError as exc:
            generation.close()
            raise APIError(400, str(exc), code="invalid_prompt") from exc
        except BaseException:  # e.g. EngineDeadError: mapped to 503 by the error handler
            generation.close()
            raise
        return generation

    def begin_drain(self) -> None:
        if not self.draining:
            log.info("draining: refusing new requests, %d in flight", self.num_in_flight)
        self.draining = True

    def expire(self) -> None:
        """The drain timeout passed: end what is still running with an explicit error."""
        for generation in list(self.active):
            generation.fail(
                APIError(
                    503,
                    "the server shut down (drain_timeout passed) before "
                    "this request finished; retry it",
                    code="shutdown",
                )
            )
