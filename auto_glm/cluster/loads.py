"""The quota keeper's view of every ingress replica's tenant loads.

Each ingress replica counts its own tenants' calls (:class:`~auto_glm.tenants.loads.Load`)
and tells the keeper: the calling tenant's load with each reservation, its load after a
call ends with each settlement, and all its tenants' loads every second while it has any.
A replica's reports are numbered, because Serve may deliver them out of order: a load is
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
class _Replica:
    seen: float
    floor: int = -1  # its last whole report: older news of any tenant is ignored
    loads: dict[str, tuple[int, Load]] = field(default_factory=dict)  # tenant -> (seq, load)


class ReplicaLoads:
    """Loads per ingress replica and tenant, as last reported (not thread-safe)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._replicas: dict[str, _Replica] = {}

    def update(self, replica: str, seq: int, loads: dict[str, Load], whole: bool = False) -> None:
        """Take ``replica``'s report number ``seq``: ``loads`` of some tenants, or with
        ``whole`` of all of them (a tenant left out has none). Older news is ignored."""
        known = self._replicas.setdefault(replica, _Replica(self._clock()))
        known.seen = self._clock()
        if seq < known.floor:
            return
        if whole:
            known.floor = seq
            known.loads = {t: entry for t, entry in known.loads.items() if entry[0] > seq}
        for tenant, load in loads.items():
            if seq >= known.loads.get(tenant, (-1, load))[0]:
                known.loads[tenant] = (seq, load)

    def others(self, replica: str, tenant: str) -> Load:
        """``tenant``'s load on every replica but ``replica``."""
        self._forget_silent()
        total = Load()
        for name, known in self._replicas.items():
            if name != replica:
                total += known.loads.get(tenant, (0, Load()))[1]
        return total

    def _forget_silent(self) -> None:
        cutoff = self._clock() - FORGET_S
        for name in [n for n, known in self._replicas.items() if known.seen < cutoff]:
            del self._replicas[name]
