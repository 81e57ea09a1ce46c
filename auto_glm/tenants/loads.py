"""A tenant's calls under way, held to its ``max_concurrent`` and ``max_queued``.

A :class:`Load` counts choices (``n`` of them per call): those accepted and not finished
are in flight, and of those, the ones not yet given a batch slot are waiting. A server
counts its own; on Ray the quota keeper adds up what every ingress replica reports
(:mod:`auto_glm.cluster.quotas`), so the limits hold for the whole application.
"""

from __future__ import annotations

from dataclasses import dataclass

from auto_glm.tenants.errors import QuotaExceeded
from auto_glm.tenants.models import Tenant

__all__ = ["Load", "check_load"]

RETRY_AFTER_S = 1  # a running call frees its slot within a few engine steps


@dataclass(frozen=True)
class Load:
    """One tenant's choices in flight and, of those, waiting for a batch slot."""

    in_flight: int = 0
    waiting: int = 0

    def __add__(self, other: Load) -> Load:
        return Load(self.in_flight + other.in_flight, self.waiting + other.waiting)

    def __bool__(self) -> bool:
        return bool(self.in_flight or self.waiting)

    @classmethod
    def starting(cls, choices: int) -> Load:
        """What a call adds when it is admitted: each choice in flight and waiting."""
        return cls(choices, choices)


def check_load(tenant: Tenant, load: Load, choices: int) -> None:
    """Raise QuotaExceeded if a call of ``choices`` on top of ``load`` would pass the
    tenant's ``max_concurrent`` or ``max_queued``. As for the server's queue, a tenant with
    nothing in flight may start any call, so a large ``n`` is not refused forever."""
    limits = tenant.limits
    for limit, count, name, words in (
        (limits.max_concurrent, load.in_flight, "max_concurrent", "in flight"),
        (limits.max_queued, load.waiting, "max_queued", "waiting"),
    ):
        if limit is not None and count and count + choices > limit:
            raise QuotaExceeded(
                name,
                f"tenant {tenant.name!r} has {count} requests {words} and this call adds "
                f"{choices}, over its limit {name}={limit}; retry after {RETRY_AFTER_S} s",
                RETRY_AFTER_S,
            )
