"""Tenants' rate and daily budgets kept once for a whole Ray application.

Each ingress replica runs the whole app, admission included; with budgets of its own, N
replicas would let a tenant reach N times its ``rpm``, ``tpm`` and ``daily_tokens``. With
more than one ingress replica, the ``quotas`` deployment (one replica) holds the only
:class:`~auto_glm.tenants.quotas.Quotas`, and every ingress asks it through a
:class:`KeptBook`: a check and a reservation are one awaited call each, a settlement is sent
without waiting. A replaced keeper starts again from the day's recorded usage, as a
restarted server does.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import replace
from typing import Any

from auto_glm.tenants import Tenant, TenantStore
from auto_glm.tenants.quotas import QuotaExceeded, Quotas, RateState, Reservation

__all__ = ["KeptBook", "QuotaKeeper"]

# a refusal crosses as (limit, message, retry_after): QuotaExceeded's own pickling loses them
_Refusal = tuple[str, str, int]
_UNTIL_LATER = ("rpm", "daily_tokens")  # refusals that hold for any call until retry_after


def _refusal(exc: QuotaExceeded) -> _Refusal:
    return exc.limit, str(exc), exc.retry_after


class QuotaKeeper:
    """The ``quotas`` deployment. Its methods are coroutines that never await, so Serve
    runs them one at a time on the replica's event loop, as :class:`Quotas` requires."""

    def __init__(self, database_url: str | None) -> None:
        self.store = TenantStore(database_url)
        self.quotas = Quotas(self.store.tokens_used)

    async def check_requests(self, tenant: Tenant) -> tuple[RateState, _Refusal | None]:
        try:
            self.quotas.check_requests(tenant)
        except QuotaExceeded as exc:
            return self.quotas.state(tenant), _refusal(exc)
        return self.quotas.state(tenant), None

    async def reserve(self, tenant: Tenant, tokens: int) -> tuple[RateState, Any]:
        """``(state, Reservation)``, or ``(state, refusal)``."""
        try:
            held: Reservation | _Refusal = self.quotas.reserve(tenant, tokens)
        except QuotaExceeded as exc:
            held = _refusal(exc)
        return self.quotas.state(tenant), held

    async def settle(self, reservation: Reservation, used: int) -> None:
        self.quotas.settle(reservation, used)


class KeptBook:
    """A :class:`~auto_glm.tenants.quotas.QuotaBook` kept by the :class:`QuotaKeeper`
    behind ``keeper`` (a Serve handle). ``state`` is the tenant's as of its last call."""

    def __init__(self, keeper: Any) -> None:
        self.keeper = keeper
        self._states: dict[str, RateState] = {}
        # tenant -> until when the keeper's last refusal of its rpm or daily budget holds
        self._refused_until: dict[str, float] = {}

    async def check_requests(self, tenant: Tenant) -> None:
        """Asks the keeper only while its last refusal of the tenant's rpm or daily budget
        may still hold. The keeper checks both again at :meth:`reserve`, so a call within
        its budgets costs one round trip to the keeper, not two."""
        if time.monotonic() >= self._refused_until.get(tenant.name, 0.0):
            return
        state, refusal = await self.keeper.check_requests.remote(tenant)
        self._learn(tenant, state, refusal)
        if refusal is not None:
            raise QuotaExceeded(*refusal)

    async def reserve(self, tenant: Tenant, tokens: int) -> Reservation:
        """A call cancelled while it waits (its client left) gives back what the keeper
        reserved for it once the keeper's answer comes."""
        asking = asyncio.ensure_future(self._reserve(tenant, tokens))
        try:
            return await asyncio.shield(asking)
        except asyncio.CancelledError:
            asking.add_done_callback(self._give_back)
            raise

    async def _reserve(self, tenant: Tenant, tokens: int) -> Reservation:
        state, held = await self.keeper.reserve.remote(tenant, tokens)
        refusal = None if isinstance(held, Reservation) else held
        self._learn(tenant, state, refusal)
        if refusal is not None:
            raise QuotaExceeded(*refusal)
        return held

    def _learn(self, tenant: Tenant, state: RateState, refusal: _Refusal | None) -> None:
        """Keep the keeper's answer about ``tenant``."""
        self._states[tenant.name] = state
        if refusal is None:
            self._refused_until.pop(tenant.name, None)
        elif refusal[0] in _UNTIL_LATER:  # a tpm refusal depends on the call's own tokens
            self._refused_until[tenant.name] = time.monotonic() + refusal[2]

    def _give_back(self, asking: asyncio.Future) -> None:
        if not asking.cancelled() and asking.exception() is None:
            self.settle(asking.result(), 0)

    def settle(self, reservation: Reservation, used: int) -> None:
        if not reservation.settled:  # the keeper settles a copy: mark this one here
            unsettled = replace(reservation)
            reservation.settled = True
            self.keeper.settle.remote(unsettled, used)

    def state(self, tenant: Tenant) -> RateState:
        limits = tenant.limits
        fresh = RateState(limits.rpm, limits.rpm, 0.0, limits.tpm, limits.tpm, 0.0)
        return self._states.get(tenant.name, fresh)
