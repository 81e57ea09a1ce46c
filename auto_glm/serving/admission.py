"""Admission control and the server's life cycle: who gets in, who is still running.

Requests beyond the engine's batch slots wait in the engine's queue; at most
``max_queued_requests`` of them may wait, the rest are refused with 429 at once so a
client can back off instead of timing out. A tenant's calls are counted here
(:meth:`Admission.tenant_load`) and held to its ``max_queued`` and ``max_concurrent``, and
reserve tokens against its rpm, tpm and daily budgets, where its
:class:`~auto_glm.serving.tenancy.Tenancy` keeps them; each call's usage is recorded when it
ends. Draining (after SIGTERM/SIGINT) refuses new work with 503 while what was accepted runs
to completion.

Each call runs on one :class:`Target` (a :class:`~auto_glm.fleet.Lease` on a loaded
version); the server's queue limit counts the calls waiting on that target's engine, and
the target is released when the call ends, however it ends.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Protocol

from auto_glm.engine.client import EngineClient
from auto_glm.engine.request import Caller
from auto_glm.engine.structured import GrammarError
from auto_glm.sampling_params import SamplingParams
from auto_glm.serving.errors import APIError, prompt_error
from auto_glm.serving.generation import Generation
from auto_glm.serving.preprocess import Prompt, prompt_length
from auto_glm.serving.tenancy import Tenancy
from auto_glm.tenants import Tenant, UsageDelta
from auto_glm.tenants.loads import Load

__all__ = ["Admission", "Target"]

log = logging.getLogger("auto_glm.serving")
RETRY_AFTER_S = 1  # the queue moves every engine step, so a short back-off is enough


class Target(Protocol):
    """Where a call runs: the engine of one served model version, held until released."""

    model: str
    version: str
    client: EngineClient

    def release(self) -> None: ...


@dataclass(eq=False)
class _Pending:
    client: EngineClient
    choices: int


class Admission:
    def __init__(
        self,
        max_queued_requests: int,
        request_timeout: float,
        tenancy: Tenancy | None = None,
        stream_interval: int = 1,
    ) -> None:
        self.tenancy = tenancy
        self.max_queued_requests = max_queued_requests
        self.request_timeout = request_timeout
        self.stream_interval = stream_interval
        self.draining = False
        self.expired = False  # drain_timeout passed: nothing more is admitted
        self._preparing = 0  # calls accepted and being prepared (see preparing)
        self.active: set[Generation] = set()
        # calls past the queue check whose tokens are being reserved (an await, when the
        # budgets are kept elsewhere): each counts as that many waiting requests meanwhile
        self._pending: list[_Pending] = []

    @property
    def num_waiting(self) -> int:
        return sum(g.num_waiting for g in self.active) + sum(p.choices for p in self._pending)

    @property
    def num_in_flight(self) -> int:
        """API calls accepted and not yet answered in full: being prepared, admitted, or
        running."""
        return len(self.active) + len(self._pending) + self._preparing

    @contextmanager
    def preparing(self) -> Iterator[None]:
        """Count a call as in flight while it is routed and prepared (its images fetched,
        its prompt tokenized), before :meth:`start` takes it over, so that a drain waits
        for it too. Start it within the same step as the block ends, so that the call is
        counted throughout."""
        self._preparing += 1
        try:
            yield
        finally:
            self._preparing -= 1

    def check_open(self) -> None:
        """Raise 503 while draining: checked before a request waits for a model to load."""
        if self.draining:
            raise APIError(
                503,
                "the server is shutting down and accepts no new requests; "
                "retry against another replica",
                code="draining",
            )

    async def start(
        self,
        target: Target,
        request_id: str,
        work: Sequence[tuple[str | Prompt, SamplingParams]],
        caller: Caller | None = None,
        *,
        tenant: Tenant | None = None,
        priority: int = 0,
        choices_per_prompt: int = 1,
        stream: bool = True,
        prompt_param: str | None = None,
    ) -> Generation:
        """Admit one API call on ``target`` and submit its engine requests, or raise
        APIError (503 draining or engine dead, 429 queue full or a tenant limit, 400 bad
        input). Nothing is left queued, and nothing reserved, on failure; the target is
        released when the call ends (at once, on failure).

        ``work`` holds ``choices_per_prompt`` consecutive choices of each prompt; a 400 for
        a prompt the engine refuses names ``prompt_param``, the field it came from."""
        try:
            generation = await self._admit(
                target, request_id, work, caller, tenant, priority, choices_per_prompt, stream
            )
        except BaseException:
            target.release()
            raise
        self.active.add(generation)
        try:
            for prompt, params in work:
                generation.submit(prompt, params)
        except ValueError as exc:
            generation.close()
            if isinstance(exc, GrammarError):
                raise APIError(
                    400, str(exc), param="response_format", code="invalid_schema"
                ) from exc
            raise prompt_error(exc, prompt_param) from exc
        except BaseException:  # e.g. EngineDeadError: mapped to 503 by the error handler
            generation.close()
            raise
        return generation

    async def _admit(
        self,
        target: Target,
        request_id: str,
        work: Sequence[tuple[str | Prompt, SamplingParams]],
        caller: Caller | None,
        tenant: Tenant | None,
        priority: int,
        choices_per_prompt: int,
        stream: bool,
    ) -> Generation:
        # a call that was accepted before a drain began is admitted: it was checked on
        # arrival (check_open), and only the end of drain_timeout stops it now
        if self.expired:
            raise _shut_down()
        client = target.client
        if not client.is_alive:
            raise APIError(
                503,
                f"the engine of {target.model}@{target.version} has stopped; restart the server",
                code="engine_dead",
            )
        waiting = sum(g.num_waiting for g in self.active if g.client is client) + sum(
            p.choices for p in self._pending if p.client is client
        )
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
        reservation = None
        if self.tenancy is not None:
            # as OpenAI counts: each prompt once, plus max_tokens for every choice
            prompts = {id(prompt): prompt_length(prompt) for prompt, _ in work}
            tokens = sum(prompts.values()) + sum(params.max_tokens for _, params in work)
            load = self.tenant_load(tenant.name) if tenant is not None else Load()
            pending = _Pending(client, len(work))
            self._pending.append(pending)
            try:
                reservation = await self.tenancy.reserve(tenant, tokens, load, len(work))
            finally:
                self._pending.remove(pending)
        generation = Generation(
            client,
            request_id,
            self.request_timeout,
            self._closed,
            caller,
            tenant=tenant,
            priority=priority,
            choices_per_prompt=choices_per_prompt,
            stream=stream,
            stream_interval=self.stream_interval,
        )
        generation.reservation = reservation
        generation.target = target
        return generation

    def _tenants_calls(self) -> Iterator[tuple[str, Load]]:
        """Each tenant's placed call here, with its choices in flight and waiting."""
        for generation in self.active:
            if generation.tenant is not None:
                load = Load(generation.num_unfinished, generation.num_waiting)
                yield generation.tenant.name, load

    def tenant_load(self, name: str) -> Load:
        """Tenant ``name``'s placed calls here, added up; calls whose tokens are being
        reserved are counted by the tenancy's book (see :meth:`QuotaBook.reserve`)."""
        return sum((load for tenant, load in self._tenants_calls() if tenant == name), Load())

    def tenant_loads(self) -> dict[str, Load]:
        """Every tenant's :meth:`tenant_load`, tenants with none left out."""
        loads: dict[str, Load] = {}
        for tenant, load in self._tenants_calls():
            loads[tenant] = loads.get(tenant, Load()) + load
        return {tenant: load for tenant, load in loads.items() if load}

    def _closed(self, generation: Generation) -> None:
        self.active.discard(generation)
        generation.target.release()
        tenant = generation.tenant
        if self.tenancy is None or tenant is None:
            return
        used = generation.usage()
        delta = UsageDelta(
            tenant.name,
            generation.target.model,
            datetime.now(timezone.utc).date(),
            requests=1,
            prompt_tokens=used.prompt_tokens,
            cached_tokens=used.cached_tokens,
            completion_tokens=used.completion_tokens,
            errors=int(used.failed),
        )
        self.tenancy.finish(generation.reservation, delta)

    def begin_drain(self) -> None:
        if not self.draining:
            log.info("draining: refusing new requests, %d in flight", self.num_in_flight)
        self.draining = True

    def expire(self) -> None:
        """The drain timeout passed: end what is still running with an explicit error, and
        refuse the calls still being prepared when they come to be admitted."""
        self.expired = True
        for generation in list(self.active):
            generation.fail(_shut_down())


def _shut_down() -> APIError:
    return APIError(
        503,
        "the server shut down (drain_timeout passed) before this request finished; retry it",
        code="shutdown",
    )
