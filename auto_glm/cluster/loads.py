"""The quota keeper's view of every ingress replica's tenant loads.

Each ingress replica counts its own tenants' running calls
(:class:`~auto_glm.tenants.loads.Load`) and tells the keeper: the calling tenant's load with
each reservation, its load after a call ends with each settlement, and all its tenants'
loads every second while it has any. The keeper adds the calls it admitted that the replica
has not placed yet (its answer is on the way back), so a call counts once, from the moment
it is admitted: every report names the replica's calls not placed when it was sent. A
replica's reports are numbered, because Serve may deliver them out of order: a load is
replaced only by a later report. A replica that stops reporting (it died, and its calls
with it) is forgotten after :data:`FORGET_S`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

from auto_glm.tenants.loads import Load

__all__ = ["FORGET_S", "REPORT_S", "ReplicaLoads"]

REPORT_S = 1.0  # an ingress replica with calls under way reports its loads this often
FORGET_S = 5.0  # the keeper forgets a replica that has not reported for this long


@dataclass
class _Tenant:
    """One tenant on one replica."""

    seq: int = -1  # the report that ``load`` came from
    load: Load = Load()  # its placed calls, as of that report
    admitted: dict[int, Load] = field(default_factory=dict)  # by the keeper: seq -> load

    def count(self) -> Load:
        return sum(self.admitted.values(), self.load)

    def take(self, seq: int, unplaced: frozenset[int], load: Load) -> None:
        if seq >= self.seq:  # calls made later, or not placed yet, are not in ``load``
            self.seq, self.load = seq, load
            self.admitted = {q: a for q, a in self.admitted.items() if q > seq or q in unplaced}


@dataclass
class _Replica:
    seen: float
    floor: int = -1  # its last whole report: older news of any tenant is ignored
    tenants: dict[str, _Tenant] = field(default_factory=dict)


class ReplicaLoads:
    """Loads per ingress replica and tenant, as last reported (not thread-safe)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._replicas: dict[str, _Replica] = {}

    def update(
        self,
        replica: str,
        seq: int,
        unplaced: frozenset[int],
        loads: dict[str, Load],
        whole: bool = False,
    ) -> None:
        """Take ``replica``'s report number ``seq``: ``loads`` of some tenants, or with
        ``whole`` of all of them (a tenant left out has none); its calls ``unplaced`` were
        not placed yet when it was sent. Older news is ignored."""
        known = self._replica(replica)
        if seq < known.floor:
            return
        for tenant in set(known.tenants) | set(loads) if whole else loads:
            entry = known.tenants.setdefault(tenant, _Tenant())
            entry.take(seq, unplaced, loads.get(tenant, Load()))
            if whole and entry.seq <= seq and not entry.count():
                del known.tenants[tenant]
        if whole:
            known.floor = seq

    def admit(self, replica: str, seq: int, tenant: str, choices: int) -> None:
        """The keeper admitted ``replica``'s call ``seq``: it counts until placed."""
        known = self._replica(replica)
        entry = known.tenants.setdefault(tenant, _Tenant())
        entry.admitted[seq] = Load.starting(choices)

    def total(self, tenant: str) -> Load:
        """``tenant``'s load on every replica."""
        cutoff = self._clock() - FORGET_S
        for name in [n for n, known in self._replicas.items() if known.seen < cutoff]:
            del self._replicas[name]
        found = (known.tenants.get(tenant) for known in self._replicas.values())
        return sum((entry.count() for entry in found if entry is not None), Load())

    def _replica(self, replica: str) -> _Replica:
        known = self._replicas.setdefault(replica, _Replica(self._clock()))
        known.seen = self._clock()
        return known
