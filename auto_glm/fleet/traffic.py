"""How a model's requests are split between its versions: weights, stickiness, policy.

``weighted`` picks a version in proportion to its weight. With ``sticky`` set to ``user``
or ``tenant`` the pick is a pure function of that key (weighted rendezvous hashing: each
version scores ``-ln(u) / weight`` with ``u`` a hash of the key and the version, the lowest
score wins), so one user keeps its version while the weights stay unchanged, and a change
of weights moves only as many users as it must. ``least_loaded`` sends each request to the
version (variant) with the shortest queue, breaking ties by KV-cache usage.
"""

from __future__ import annotations

import hashlib
import math
import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Literal

__all__ = ["OUTCOMES_KEPT_S", "Load", "RollbackRule", "Sticky", "Traffic", "TrafficError"]

Sticky = Literal["user", "tenant", "none"]
Policy = Literal["weighted", "least_loaded"]
_SPREAD = 2.0**64
OUTCOMES_KEPT_S = 600.0  # how far back a version's request outcomes reach


class TrafficError(ValueError):
    """A traffic setting that cannot be applied; the message names the field and the fix."""


@dataclass(frozen=True)
class RollbackRule:
    """When a canary is rolled back: over the last ``window_s`` seconds, once it has served
    ``min_requests``, an error rate above ``max_error_rate`` or a 95th percentile time to
    first token above ``max_p95_ttft_s`` (either may be None: not checked)."""

    max_error_rate: float | None = None
    max_p95_ttft_s: float | None = None
    window_s: float = 60.0
    min_requests: int = 20

    def __post_init__(self) -> None:
        if self.max_error_rate is None and self.max_p95_ttft_s is None:
            raise TrafficError(
                "rollback checks nothing: set rollback.max_error_rate, "
                "rollback.max_p95_ttft_s or both"
            )
        for name, value, low in (
            ("max_error_rate", self.max_error_rate, 0.0),
            ("max_p95_ttft_s", self.max_p95_ttft_s, 0.0),
            ("window_s", self.window_s, 0.0),
        ):
            if value is not None and not (math.isfinite(value) and value >= low):
                raise TrafficError(f"rollback.{name}={value!r} is invalid: use a finite number")
        if not 0 < self.window_s <= OUTCOMES_KEPT_S:
            raise TrafficError(
                f"rollback.window_s={self.window_s:g} is invalid: a version's outcomes are kept "
                f"for {OUTCOMES_KEPT_S:g} s, so use a window above 0 and at most that"
            )


@dataclass(frozen=True)
class Load:
    """A version's load as ``least_loaded`` compares it."""

    waiting: int
    kv_usage: float


@dataclass(frozen=True)
class Traffic:
    """The split of one model's requests; ``weights`` hold only versions that get traffic."""

    weights: Mapping[str, float]
    sticky: Sticky = "none"
    policy: Policy = "weighted"
    rollback: RollbackRule | None = None
    stable: str = field(default="")

    def __post_init__(self) -> None:
        if not self.weights:
            raise TrafficError("weights: give at least one version a weight above 0")
        for version, weight in self.weights.items():
            if not (isinstance(weight, int | float) and math.isfinite(weight) and weight >= 0):
                raise TrafficError(f"weights.{version}={weight!r} is invalid: use a number >= 0")
        weights = dict(sorted(self.weights.items()))
        top = max(weights.values())
        if top <= 0:
            raise TrafficError("weights: give at least one version a weight above 0")
        total = sum(weights.values())
        if math.isinf(total):  # weights near 1e308: every share would be 0, every pick fail
            weights = {v: w / top for v, w in weights.items()}
            total = sum(weights.values())
        shares = {v: w / total for v, w in weights.items() if w > 0}
        object.__setattr__(self, "weights", shares)
        if not self.stable or self.stable not in shares:
            # the stable version is the one carrying the most traffic (ties: by name)
            object.__setattr__(self, "stable", max(shares, key=lambda v: (shares[v], v)))

    @classmethod
    def single(cls, version: str) -> Traffic:
        return cls({version: 1.0})

    @property
    def canaries(self) -> list[str]:
        """Versions with traffic besides the stable one: what a rollback rule watches."""
        return [v for v in self.weights if v != self.stable]

    def pick(self, key: str | None, load: Callable[[str], Load] | None = None) -> str:
        """The version for one request; ``key`` is the sticky key (None: not sticky)."""
        versions = list(self.weights)
        if len(versions) == 1:
            return versions[0]
        if self.policy == "least_loaded" and load is not None:
            loads = {v: load(v) for v in versions}
            return min(
                versions, key=lambda v: (loads[v].waiting, loads[v].kv_usage, random.random())
            )
        if key is None:
            return random.choices(versions, weights=[self.weights[v] for v in versions])[0]
        return min(versions, key=lambda v: _score(key, v, self.weights[v]))


def _score(key: str, version: str, weight: float) -> float:
    digest = hashlib.sha256(f"{key}\0{version}".encode()).digest()
    u = (int.from_bytes(digest[:8], "big") + 0.5) / _SPREAD  # in (0, 1)
    return -math.log(u) / weight
