"""Queue policies: who is admitted next, and who is preempted, when requests compete.

The scheduler keeps its waiting and running lists sorted by :meth:`QueuePolicy.key`,
asks :meth:`~QueuePolicy.admission_order` which waiting requests to try first,
:meth:`~QueuePolicy.victim` which running request to preempt when the KV cache runs out,
and :meth:`~QueuePolicy.rebalance_victim` whether a waiting request deserves a slot that a
running one holds. Policies:

* ``fcfs``: arrival order.
* ``priority``: the request's ``priority`` (lower first), then arrival.
* ``fair``: a weighted fair share of engine tokens (prefill and decode) between tenants.
  Each tenant has a virtual time, the tokens it was served divided by its weight, and the
  tenant furthest behind is admitted first (on a tie, the one holding fewer slots). When
  every batch slot is taken and that tenant holds less than its weighted share of the
  slots, the tenant most over its share gives one up: its request with the fewest tokens
  in the cache is preempted. A tenant that becomes active starts level with the
  least-served active one, so idling earns no credit.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Sequence

from auto_glm.engine.request import Request

__all__ = ["FairPolicy", "FcfsPolicy", "POLICIES", "PriorityPolicy", "QueuePolicy", "make_policy"]


class QueuePolicy:
    """``fcfs``; subclasses change the order, the victim and the accounting."""

    name = "fcfs"

    def key(self, request: Request) -> tuple:
        """Sort key of the waiting and running lists: lower runs first, is preempted last."""
        return (request.arrival_time,)

    def admission_order(
        self, waiting: Sequence[Request], running: Sequence[Request]
    ) -> Sequence[Request]:
        """The waiting requests in the order admission tries them (head-of-line blocking)."""
        return waiting

    def victim(self, running: Sequence[Request], start: int) -> int:
        """Index of the request to preempt, from ``running[start:]`` (the requests not yet
        scheduled in this step)."""
        return len(running) - 1

    def rebalance_victim(
        self, waiting: Sequence[Request], running: Sequence[Request]
    ) -> int | None:
        """Index of a running request to preempt so that a waiting one can run, or None."""
        return None

    def added(self, request: Request) -> None:
        """``request`` entered the scheduler."""

    def charge(self, request: Request, num_tokens: int) -> None:
        """``request`` is fed ``num_tokens`` tokens in this step."""

    def finished(self, request: Request) -> None:
        """``request`` left the scheduler."""


class FcfsPolicy(QueuePolicy):
    pass


class PriorityPolicy(QueuePolicy):
    name = "priority"

    def key(self, request: Request) -> tuple:
        return (request.priority, request.arrival_time)


class FairPolicy(QueuePolicy):
    """Weighted fair sharing between ``Request.tenant`` values (None is a tenant of its
    own), each with its requests' ``weight``."""

    name = "fair"

    def __init__(self) -> None:
        self.virtual_time: dict[str | None, float] = defaultdict(float)
        self._active: dict[str | None, int] = defaultdict(int)

    def key(self, request: Request) -> tuple:
        return (request.priority, request.arrival_time)

    def admission_order(
        self, waiting: Sequence[Request], running: Sequence[Request]
    ) -> Sequence[Request]:
        # Virtual times tie when a tenant becomes active; then the tenant holding fewer
        # batch slots (per weight) goes first.
        held = Counter(r.tenant for r in running)
        return sorted(
            waiting,
            key=lambda r: (
                self.virtual_time[r.tenant],
                held[r.tenant] / r.weight,
                r.priority,
                r.arrival_time,
            ),
        )

    def victim(self, running: Sequence[Request], start: int) -> int:
        # the latest request of the tenant furthest ahead
        return max(
            range(start, len(running)),
            key=lambda i: (self.virtual_time[running[i].tenant], self.key(running[i])),
        )

    def rebalance_victim(
        self, waiting: Sequence[Request], running: Sequence[Request]
    ) -> int | None:
        """A slot for the waiting tenant furthest behind, if one more slot keeps it within
        its weighted share of the batch, taken from the tenant most over its share."""
        if not waiting or not running:
            return None
        weights = {r.tenant: r.weight for r in (*running, *waiting)}
        total = sum(weights.values())
        share = {t: len(running) * w / total for t, w in weights.items()}
        held = Counter(r.tenant for r in running)
        behind = self.admission_order(waiting, running)[0].tenant
        if held[behind] + 1 > share[behind]:
            return None
        over = [t for t in held if t != behind and held[t] - 1 >= share[t]]
        if not over:
            return None
        ahead = max(over, key=lambda t: held[t] / weights[t])
        # of its requests, the one with the fewest tokens in the cache: the least to redo
        return min(
            (i for i, r in enumerate(running) if r.tenant == ahead),
            key=lambda i: running[i].num_computed_tokens,
        )

    def added(self, request: Request) -> None:
        tenant = request.tenant
        if not self._active[tenant]:
            others = [self.virtual_time[t] for t, n in self._active.items() if n and t != tenant]
            if others:  # level with the least-served active tenant: idling banks no credit
                self.virtual_time[tenant] = max(self.virtual_time[tenant], min(others))
        self._active[tenant] += 1

    def charge(self, request: Request, num_tokens: int) -> None:
        self.virtual_time[request.tenant] += num_tokens / request.weight

    def finished(self, request: Request) -> None:
        self._active[request.tenant] -= 1


POLICIES = ("fcfs", "priority", "fair")


def make_policy(name: str) -> QueuePolicy:
    """The policy called ``name`` (one of :data:`POLICIES`)."""
    if name == "fcfs":
        return FcfsPolicy()
    if name == "priority":
        return PriorityPolicy()
    if name == "fair":
        return FairPolicy()
    raise ValueError(f"queue_policy={name!r} is invalid: use one of {', '.join(POLICIES)}")
