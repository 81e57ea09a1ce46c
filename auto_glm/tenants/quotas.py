"""Per-tenant request and token budgets of one server process: rpm, tpm and daily tokens.

Tokens are reserved when a call is admitted, as OpenAI counts them: the prompt plus
``max_tokens`` for every choice. When the call ends the reservation is replaced by what it
really used, so unused tokens come back. Reserving first means that concurrent calls can
never together pass a limit. Budgets are per :class:`Quotas` object; the daily budget
starts from what the store has recorded for the day, so a restart does not reset it.

A server asks a :class:`QuotaBook`, which also holds tenants to their ``max_concurrent``
and ``max_queued`` (:mod:`auto_glm.tenants.loads`): its own :class:`Quotas`
(:class:`LocalBook`), or on Ray one keeper that every ingress replica shares
(:mod:`auto_glm.cluster.quotas`).
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import date, datetime, timezone
from typing import Protocol

from auto_glm.tenants.errors import QuotaExceeded
from auto_glm.tenants.loads import Load, check_load
from auto_glm.tenants.models import Tenant

__all__ = ["LocalBook", "QuotaBook", "QuotaExceeded", "Quotas", "RateState", "Reservation"]

_WINDOW_S = 60.0


@dataclass(frozen=True)
class RateState:
    """OpenAI's rate-limit headers for one tenant: limits, what is left, seconds to reset."""

    limit_requests: int | None
    remaining_requests: int | None
    reset_requests: float
    limit_tokens: int | None
    remaining_tokens: int | None
    reset_tokens: float

    def headers(self) -> dict[str, str]:
        found = {}
        if self.limit_requests is not None:
            found["x-ratelimit-limit-requests"] = str(self.limit_requests)
            found["x-ratelimit-remaining-requests"] = str(self.remaining_requests)
            found["x-ratelimit-reset-requests"] = _duration(self.reset_requests)
        if self.limit_tokens is not None:
            found["x-ratelimit-limit-tokens"] = str(self.limit_tokens)
            found["x-ratelimit-remaining-tokens"] = str(self.remaining_tokens)
            found["x-ratelimit-reset-tokens"] = _duration(self.reset_tokens)
        return found


def _duration(seconds: float) -> str:
    """OpenAI's reset format: ``1s``, ``6m0s``, ``250ms``."""
    if seconds < 1:
        return f"{max(0, round(seconds * 1000))}ms"
    whole = math.ceil(seconds)
    minutes, secs = divmod(whole, 60)
    return f"{minutes}m{secs}s" if minutes else f"{secs}s"


@dataclass
class Reservation:
    """Tokens held for one admitted call until :meth:`Quotas.settle`."""

    tenant: str
    tokens: int
    at: float
    day: date
    settled: bool = False


@dataclass
class _Budget:
    requests: deque = field(default_factory=deque)  # admission times in the window
    tokens: deque = field(default_factory=deque)  # [time, tokens] pairs in the window
    day: date | None = None
    day_tokens: int = 0


class Quotas:
    """Rate and daily budgets per tenant, on the event loop (not thread-safe).

    ``tokens_used(tenant, day)`` reads the day's recorded usage the first time a tenant is
    seen on a day (the store's :meth:`~auto_glm.tenants.TenantStore.tokens_used`).
    """

    def __init__(
        self,
        tokens_used: Callable[[str, date], int],
        clock: Callable[[], float] = time.monotonic,
        utc_now: Callable[[], datetime] = lambda: datetime.now(timezone.utc),
    ) -> None:
        self._tokens_used = tokens_used
        self._clock = clock
        self._utc_now = utc_now
        self._budgets: dict[str, _Budget] = {}

    def _budget(self, tenant: str, now: float) -> _Budget:
        budget = self._budgets.setdefault(tenant, _Budget())
        while budget.requests and budget.requests[0] <= now - _WINDOW_S:
            budget.requests.popleft()
        while budget.tokens and budget.tokens[0][0] <= now - _WINDOW_S:
            budget.tokens.popleft()
        today = self._utc_now().date()
        if budget.day != today:
            budget.day, budget.day_tokens = today, self._tokens_used(tenant, today)
        return budget

    def state(self, tenant: Tenant) -> RateState:
        now = self._clock()
        budget = self._budget(tenant.name, now)
        limits = tenant.limits
        used = sum(n for _, n in budget.tokens)
        return RateState(
            limits.rpm,
            None if limits.rpm is None else max(0, limits.rpm - len(budget.requests)),
            budget.requests[0] + _WINDOW_S - now if budget.requests else 0.0,
            limits.tpm,
            None if limits.tpm is None else max(0, limits.tpm - used),
            budget.tokens[0][0] + _WINDOW_S - now if budget.tokens else 0.0,
        )

    def check_requests(self, tenant: Tenant) -> None:
        """Raise QuotaExceeded if one more request now would pass ``rpm`` or the daily
        budget is spent (cheap: call it before doing any work for the request)."""
        now = self._clock()
        budget = self._budget(tenant.name, now)
        limits = tenant.limits
        if limits.rpm is not None and len(budget.requests) >= limits.rpm:
            wait = budget.requests[0] + _WINDOW_S - now
            raise QuotaExceeded(
                "rpm",
                f"tenant {tenant.name!r} reached its limit of {limits.rpm} requests per minute "
                f"(rpm); retry after {math.ceil(wait)} s",
                max(1, math.ceil(wait)),
            )
        if limits.daily_tokens is not None and budget.day_tokens >= limits.daily_tokens:
            raise QuotaExceeded(
                "daily_tokens",
                f"tenant {tenant.name!r} used its daily budget of {limits.daily_tokens} tokens "
                "(daily_tokens); it renews at 00:00 UTC",
                self._seconds_to_midnight(),
            )

    def reserve(self, tenant: Tenant, tokens: int) -> Reservation:
        """Admit one request that may use up to ``tokens``, or raise QuotaExceeded naming
        the limit (rpm, tpm or daily_tokens) it would pass; ``retry_after`` None: the
        request alone is over the limit, so no wait makes it fit."""
        self.check_requests(tenant)
        now = self._clock()
        budget = self._budget(tenant.name, now)
        limits = tenant.limits
        for limit, name, per in (
            (limits.tpm, "tpm", "tokens per minute"),
            (limits.daily_tokens, "daily_tokens", "tokens a day"),
        ):
            if limit is not None and tokens > limit:
                raise QuotaExceeded(
                    name,
                    f"this request may use {tokens} tokens (prompt + max_tokens per choice), "
                    f"more than tenant {tenant.name!r}'s limit of {limit} {per} ({name}), "
                    "so it can never run; lower max_tokens or shorten the prompt",
                    None,
                )
        if limits.tpm is not None:
            used = sum(n for _, n in budget.tokens)
            if used + tokens > limits.tpm:
                # tokens <= tpm here, so something is in the window: wait for the oldest
                wait = budget.tokens[0][0] + _WINDOW_S - now
                raise QuotaExceeded(
                    "tpm",
                    f"tenant {tenant.name!r} reached its limit of {limits.tpm} tokens per minute "
                    f"(tpm): {used} used or reserved, this request may use {tokens}; retry "
                    f"after {math.ceil(wait)} s or lower max_tokens",
                    max(1, math.ceil(wait)),
                )
        if limits.daily_tokens is not None and budget.day_tokens + tokens > limits.daily_tokens:
            left = limits.daily_tokens - budget.day_tokens
            raise QuotaExceeded(
                "daily_tokens",
                f"this request may use {tokens} tokens but tenant {tenant.name!r} has {left} "
                f"of its daily budget of {limits.daily_tokens} left (daily_tokens); lower "
                "max_tokens, or wait for 00:00 UTC",
                self._seconds_to_midnight(),
            )
        budget.requests.append(now)
        budget.tokens.append([now, tokens])
        budget.day_tokens += tokens
        return Reservation(tenant.name, tokens, now, budget.day)

    def _seconds_to_midnight(self) -> int:
        now = self._utc_now()
        return 86400 - (now.hour * 3600 + now.minute * 60 + now.second)

    def settle(self, reservation: Reservation, used: int) -> None:
        """Replace the reservation by the ``used`` tokens (once; later calls do nothing)."""
        if reservation.settled:
            return
        reservation.settled = True
        budget = self._budgets.get(reservation.tenant)
        if budget is None:
            return
        refund = reservation.tokens - used
        for entry in budget.tokens:
            if entry[0] == reservation.at:
                entry[1] -= refund
                break
        if budget.day == reservation.day:
            budget.day_tokens -= refund


class QuotaBook(Protocol):
    """Where a server checks and reserves its tenants' budgets (see :class:`Quotas`) and
    holds them to ``max_concurrent`` and ``max_queued`` (see :class:`Load`).

    ``check_requests`` and ``reserve`` may have to ask another process, so they are
    awaited; ``settle`` is sent without waiting, and ``state`` is what the book last knew.
    ``loads()``, given once to :meth:`follow`, is the server's tenants' loads at any time
    (tenants with none left out).
    """

    def follow(self, loads: Callable[[], dict[str, Load]]) -> None: ...

    async def check_requests(self, tenant: Tenant) -> None: ...

    async def reserve(self, tenant: Tenant, tokens: int, load: Load, choices: int) -> Reservation:
        """Admit a call of ``choices`` that may use up to ``tokens``, on top of the
        tenant's ``load`` placed on this server, or raise QuotaExceeded naming the limit
        (QuotaUnavailable, as ``check_requests`` may, when the limits cannot be checked).
        A book that awaits counts the calls it admitted until their callers place them
        (before they next yield)."""

    def settle(self, reservation: Reservation, used: int) -> None: ...

    def state(self, tenant: Tenant) -> RateState: ...


class LocalBook:
    """This process's own :class:`Quotas` as a :class:`QuotaBook`: nothing is awaited, so
    a check and the admission that follows it happen in one step of the event loop, and
    the server's own loads are all there is."""

    def __init__(self, quotas: Quotas) -> None:
        self.quotas = quotas

    def follow(self, loads: Callable[[], dict[str, Load]]) -> None:
        """Nothing to do: :meth:`reserve` is given the only load that counts."""

    async def check_requests(self, tenant: Tenant) -> None:
        self.quotas.check_requests(tenant)

    async def reserve(self, tenant: Tenant, tokens: int, load: Load, choices: int) -> Reservation:
        check_load(tenant, load, choices)
        return self.quotas.reserve(tenant, tokens)

    def settle(self, reservation: Reservation, used: int) -> None:
        self.quotas.settle(reservation, used)

    def state(self, tenant: Tenant) -> RateState:
        return self.quotas.state(tenant)
