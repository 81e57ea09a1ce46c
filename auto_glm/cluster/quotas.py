"""Tenants' budgets and limits kept once for a whole Ray application.

Each ingress replica runs the whole app, admission included; on its own, each of N
replicas would let a tenant reach N times its ``rpm``, ``tpm``, ``daily_tokens``,
``max_concurrent`` and ``max_queued``. With more than one ingress replica, the ``quotas``
deployment (one replica) holds the only :class:`~auto_glm.tenants.quotas.Quotas` and adds up
the tenants' loads that every ingress reports (:class:`~auto_glm.cluster.loads.ReplicaLoads`);
every ingress asks it through a :class:`KeptBook`. Checks and reservations are awaited,
settlements and load reports are not; an ingress has one Serve call to the keeper in
flight at a time, which carries every call made while the one before it was out. A
replaced keeper starts again from the day's recorded usage, as a restarted server does,
and learns the loads from the next reports (within a second).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import replace
from typing import Any

from auto_glm.cluster.loads import REPORT_S, ReplicaLoads
from auto_glm.tenants import Tenant, TenantStore
from auto_glm.tenants.errors import QuotaUnavailable
from auto_glm.tenants.loads import Load, check_load
from auto_glm.tenants.quotas import QuotaExceeded, Quotas, RateState, Reservation

__all__ = ["KeptBook", "QuotaKeeper"]

log = logging.getLogger("auto_glm.cluster")

# a refusal crosses as (limit, message, retry_after): QuotaExceeded's own pickling loses them
_Refusal = tuple[str, str, int | None]
_UNTIL_LATER = ("rpm", "daily_tokens")  # refusals that hold for any call until retry_after
_CALLS = frozenset(("check_requests", "reserve", "settle", "report"))


def _refusal(exc: QuotaExceeded) -> _Refusal:
    return exc.limit, str(exc), exc.retry_after


class QuotaKeeper:
    """The ``quotas`` deployment. Its methods are coroutines that never await, so Serve
    runs them one at a time on the replica's event loop, as :class:`Quotas` requires."""

    def __init__(self, database_url: str | None) -> None:
        self.store = TenantStore(database_url)
        self.quotas = Quotas(self.store.tokens_used)
        self.loads = ReplicaLoads()

    async def check_requests(self, tenant: Tenant) -> tuple[RateState, _Refusal | None]:
        try:
            self.quotas.check_requests(tenant)
        except QuotaExceeded as exc:
            return self.quotas.state(tenant), _refusal(exc)
        return self.quotas.state(tenant), None

    async def reserve(
        self,
        replica: str,
        seq: int,
        unplaced: frozenset[int],
        tenant: Tenant,
        tokens: int,
        load: Load,
        choices: int,
    ) -> tuple[RateState, Any]:
        """``(state, Reservation)``, or ``(state, refusal)``, for call ``seq`` of
        ``choices`` on ``replica``, where the tenant has ``load`` placed."""
        self.loads.update(replica, seq, unplaced, {tenant.name: load})
        try:
            check_load(tenant, self.loads.total(tenant.name), choices)
            held: Reservation | _Refusal = self.quotas.reserve(tenant, tokens)
        except QuotaExceeded as exc:
            held = _refusal(exc)
        else:  # counted at once, for the next call from any replica
            self.loads.admit(replica, seq, tenant.name, choices)
        return self.quotas.state(tenant), held

    async def settle(
        self,
        replica: str,
        seq: int,
        unplaced: frozenset[int],
        reservation: Reservation,
        used: int,
        load: Load,
    ) -> None:
        """The call ended; ``load`` is its tenant's on ``replica`` without it."""
        self.loads.update(replica, seq, unplaced, {reservation.tenant: load})
        self.quotas.settle(reservation, used)

    async def report(
        self, replica: str, seq: int, unplaced: frozenset[int], loads: dict[str, Load]
    ) -> None:
        """All of ``replica``'s tenants' loads (tenants left out have none)."""
        self.loads.update(replica, seq, unplaced, loads, whole=True)

    async def apply(self, calls: list[tuple[str, tuple]]) -> list[Any]:
        """Carry out one ingress's ``(method, args)`` calls, in order; their answers."""
        answers = []
        for name, args in calls:
            if name not in _CALLS:
                raise ValueError(f"the quota keeper has no call {name!r}")
            answers.append(await getattr(self, name)(*args))
        return answers


class KeptBook:
    """A :class:`~auto_glm.tenants.quotas.QuotaBook` kept by the :class:`QuotaKeeper`
    behind ``keeper`` (a Serve handle). ``state`` is the tenant's as of its last call."""

    def __init__(self, keeper: Any) -> None:
        self.keeper = keeper
        self.replica = uuid.uuid4().hex  # this ingress, to the keeper
        self._next = 0  # the number of the next call to the keeper
        self._unplaced: set[int] = set()  # reservations asked for and not yet placed
        self._loads: Callable[[], dict[str, Load]] = dict
        self._reporter: asyncio.Task | None = None
        # calls waiting for the one in flight to the keeper, with the futures of their answers
        self._outbox: list[tuple[tuple[str, tuple], asyncio.Future | None]] = []
        self._sender: asyncio.Task | None = None
        self._watching: set[asyncio.Task] = set()  # batches no caller waits for
        self._states: dict[str, RateState] = {}
        # tenant -> until when the keeper's last refusal of its rpm or daily budget holds
        self._refused_until: dict[str, float] = {}

    def follow(self, loads: Callable[[], dict[str, Load]]) -> None:
        self._loads = loads

    async def check_requests(self, tenant: Tenant) -> None:
        """Asks the keeper only while its last refusal of the tenant's rpm or daily budget
        may still hold. The keeper checks both again at :meth:`reserve`, so a call within
        its budgets costs one round trip to the keeper, not two."""
        if time.monotonic() >= self._refused_until.get(tenant.name, 0.0):
            return
        state, refusal = await self._ask("check_requests", tenant)
        self._learn(tenant, state, refusal)
        if refusal is not None:
            raise QuotaExceeded(*refusal)

    async def reserve(self, tenant: Tenant, tokens: int, load: Load, choices: int) -> Reservation:
        """Until the caller places the call (it does so before it next yields), the keeper
        counts it among the tenant's calls itself. A call cancelled while it waits (its
        client left) gives back what the keeper reserved for it once the answer comes.
        While this ingress has calls under way it reports its loads every
        :data:`~auto_glm.cluster.loads.REPORT_S`."""
        self._keep_reporting()
        seq, unplaced = self._stamp(placing=True)
        asking = self._ask("reserve", self.replica, seq, unplaced, tenant, tokens, load, choices)
        try:
            state, held = await asyncio.shield(asking)
        except asyncio.CancelledError:
            asking.add_done_callback(functools.partial(self._give_back, seq))
            raise
        finally:
            if asking.done():
                self._unplaced.discard(seq)
        refusal = None if isinstance(held, Reservation) else held
        self._learn(tenant, state, refusal)
        if refusal is not None:
            raise QuotaExceeded(*refusal)
        return held

    def _stamp(self, placing: bool = False) -> tuple[int, frozenset[int]]:
        """A number for the next call to the keeper, in the order they are made, and the
        reservations not placed yet; ``placing``: this call is one."""
        seq = self._next
        self._next += 1
        if placing:
            self._unplaced.add(seq)
        return seq, frozenset(self._unplaced)

    def _keep_reporting(self) -> None:
        if self._reporter is None or self._reporter.done():
            self._reporter = asyncio.get_running_loop().create_task(self._report())

    async def _report(self) -> None:
        """Every REPORT_S, until a report says that no call is left."""
        while True:
            await asyncio.sleep(REPORT_S)
            loads = self._loads()
            self._tell("report", self.replica, *self._stamp(), loads)
            if not loads:
                return

    def _ask(self, name: str, *args: Any) -> asyncio.Future:
        """The keeper's answer to one call, sent with the others made meanwhile."""
        answer = asyncio.get_running_loop().create_future()
        self._post((name, args), answer)
        return answer

    def _tell(self, name: str, *args: Any) -> None:
        """One call whose answer nobody waits for (a settlement, a report)."""
        self._post((name, args), None)

    def _post(self, call: tuple[str, tuple], answer: asyncio.Future | None) -> None:
        self._outbox.append((call, answer))
        if self._sender is None or self._sender.done():
            self._sender = asyncio.get_running_loop().create_task(self._send())

    async def _send(self) -> None:
        """One awaited Serve call to the keeper at a time, carrying every call posted since
        the last one went: at concurrency a call costs a fraction of a round trip."""
        while self._outbox:
            batch, self._outbox = self._outbox, []
            waiting = [answer for _, answer in batch]
            sent = self.keeper.apply.remote([call for call, _ in batch])
            if not any(answer is not None for answer in waiting):
                # settlements and reports only: the next calls need not wait
                watch = asyncio.get_running_loop().create_task(self._unanswered(sent, batch))
                self._watching.add(watch)
                watch.add_done_callback(self._watching.discard)
                continue
            try:
                answers = await sent
            except Exception as exc:  # every waiting call fails; each caller is told so
                failure = self._failed(batch, exc)
                for answer in waiting:
                    if answer is not None and not answer.done():
                        answer.set_exception(failure)
                continue
            for answer, given in zip(waiting, answers, strict=True):
                if answer is not None and not answer.done():
                    answer.set_result(given)

    async def _unanswered(self, sent: Any, batch: list) -> None:
        """Wait for a batch of settlements and reports that nobody waits for, to log its
        failure (a replaced keeper starts again from the recorded usage)."""
        try:
            await sent
        except Exception as exc:
            self._failed(batch, exc)

    @staticmethod
    def _failed(batch: list, exc: Exception) -> QuotaUnavailable:
        """Log a batch the keeper did not carry out; what its callers are told."""
        calls = ", ".join(sorted({name for (name, _), _ in batch}))
        log.warning("the quota keeper failed %d calls (%s): %r", len(batch), calls, exc)
        return QuotaUnavailable(
            f"the quota keeper, which checks tenants' limits for this application, failed "
            f"({type(exc).__name__}), so the call was not admitted; retry shortly (see the "
            "server log)"
        )

    def _learn(self, tenant: Tenant, state: RateState, refusal: _Refusal | None) -> None:
        """Keep the keeper's answer about ``tenant``."""
        self._states[tenant.name] = state
        if refusal is None:
            self._refused_until.pop(tenant.name, None)
        elif refusal[0] in _UNTIL_LATER and refusal[2] is not None:
            # a tpm refusal, or one of a call over a limit alone, depends on its own tokens
            self._refused_until[tenant.name] = time.monotonic() + refusal[2]

    def _give_back(self, seq: int, asking: asyncio.Future) -> None:
        """The answer to a cancelled reservation came: it will never be placed."""
        self._unplaced.discard(seq)
        if not asking.cancelled() and asking.exception() is None:
            _, held = asking.result()
            if isinstance(held, Reservation):
                self.settle(held, 0)

    def settle(self, reservation: Reservation, used: int) -> None:
        if not reservation.settled:  # the keeper settles a copy: mark this one here
            unsettled = replace(reservation)
            reservation.settled = True
            load = self._loads().get(reservation.tenant, Load())
            self._tell("settle", self.replica, *self._stamp(), unsettled, used, load)

    def state(self, tenant: Tenant) -> RateState:
        limits = tenant.limits
        fresh = RateState(limits.rpm, limits.rpm, 0.0, limits.tpm, limits.tpm, 0.0)
        return self._states.get(tenant.name, fresh)
