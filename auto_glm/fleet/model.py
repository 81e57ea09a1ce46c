"""A served model (its versions, traffic and rollbacks) and a request's lease on a version."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from auto_glm.engine.client import EngineClient
from auto_glm.fleet.traffic import Traffic
from auto_glm.fleet.version import ServedVersion

__all__ = ["Lease", "RollbackEvent", "ServedModel"]


@dataclass(frozen=True)
class RollbackEvent:
    at: datetime
    version: str
    restored: str
    reason: str


class ServedModel:
    def __init__(self, name: str, keep_alive: float | None, kv_share: float) -> None:
        self.name = name
        self.keep_alive = keep_alive
        self.kv_share = kv_share
        self.versions: dict[str, ServedVersion] = {}
        self.traffic: Traffic | None = None
        self.rollbacks: list[RollbackEvent] = []
        self.rollback_counts: Counter[str] = Counter()

    def weight(self, version: str) -> float:
        return self.traffic.weights.get(version, 0.0) if self.traffic else 0.0

    def describe(self) -> dict[str, Any]:
        traffic = self.traffic
        rule = None if traffic is None else traffic.rollback
        return {
            "name": self.name,
            "keep_alive": self.keep_alive,
            "kv_share": self.kv_share,
            "traffic": None
            if traffic is None
            else {
                "weights": dict(traffic.weights),
                "stable": traffic.stable,
                "sticky": traffic.sticky,
                "policy": traffic.policy,
                "rollback": None if rule is None else dict(vars(rule)),
            },
            "versions": [v.describe(self.weight(k)) for k, v in self.versions.items()],
            "rollbacks": [
                {
                    "at": e.at.isoformat(),
                    "version": e.version,
                    "restored": e.restored,
                    "reason": e.reason,
                }
                for e in self.rollbacks
            ],
        }


class Lease:
    """A request's hold on one loaded version; the version stays loaded until released."""

    def __init__(self, version: ServedVersion, on_release: Callable[[ServedVersion], None]):
        self._version, self._on_release = version, on_release
        self.model, self.version = version.model, version.version
        self.client: EngineClient = version.engine  # type: ignore[assignment]
        self._released = False

    def release(self) -> None:
        """Give the version back (idempotent): the last release may unload a retired one."""
        if not self._released:
            self._released = True
            self._on_release(self._version)
