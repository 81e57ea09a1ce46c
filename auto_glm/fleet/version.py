"""One version of a served model: its source, its engine (when loaded) and its use."""

from __future__ import annotations

import asyncio
import time
from datetime import datetime, timezone
from enum import Enum
from typing import Any

from auto_glm.engine.client import EngineClient
from auto_glm.fleet.canary import OutcomeWindow
from auto_glm.fleet.sources import VersionSource
from auto_glm.fleet.traffic import Load

__all__ = ["ServedVersion", "VersionState"]


class VersionState(str, Enum):
    UNLOADED = "unloaded"  # not in memory (never loaded, idle past keep_alive, or retired)
    LOADING = "loading"  # being verified and loaded; requests for it wait
    READY = "ready"
    FAILED = "failed"  # the last load failed; the next request tries again


class ServedVersion:
    """Mutated on the event loop only, except ``outcomes`` (the engine's output thread)."""

    def __init__(self, model: str, source: VersionSource) -> None:
        self.model = model
        self.version = source.version
        self.source = source
        self.engine: EngineClient | None = None
        self.state = VersionState.UNLOADED
        self.error: str | None = None
        self.in_flight = 0  # leases held: requests routed here and not finished
        self.last_used = time.monotonic()
        self.loaded_at: datetime | None = None
        self.loading: asyncio.Task[None] | None = None
        self.outcomes = OutcomeWindow()

    @property
    def ref(self) -> str:
        return f"{self.model}@{self.version}"

    @property
    def ready(self) -> bool:
        return self.state is VersionState.READY and self.engine is not None

    @property
    def shown_state(self) -> VersionState:
        """``state`` as listed: a loaded version whose engine has stopped is ``failed``
        (its calls are refused with 503 ``engine_dead`` until the server restarts)."""
        engine = self.engine
        if self.state is VersionState.READY and engine is not None and not engine.is_alive:
            return VersionState.FAILED
        return self.state

    def load(self) -> Load:
        """Queue depth and KV-cache usage, for the ``least_loaded`` policy."""
        if self.engine is None:
            return Load(waiting=1 << 30, kv_usage=1.0)  # a cold variant is the last resort
        stats = self.engine.stats()
        return Load(waiting=stats.num_waiting, kv_usage=stats.kv_usage)

    def mark_loaded(self, engine: EngineClient) -> None:
        self.engine, self.state, self.error = engine, VersionState.READY, None
        self.loaded_at = datetime.now(timezone.utc)
        self.last_used = time.monotonic()

    def take_engine(self) -> EngineClient | None:
        """Detach the engine for shutdown; the version reads as unloaded from now on."""
        engine, self.engine = self.engine, None
        self.state = VersionState.UNLOADED
        self.loaded_at = None
        return engine

    def describe(self, weight: float) -> dict[str, Any]:
        summary = self.outcomes.summary(60.0)
        return {
            "version": self.version,
            "state": self.shown_state.value,
            "weight": weight,
            "in_flight": self.in_flight,
            "loaded_at": self.loaded_at.isoformat() if self.loaded_at else None,
            "error": self.error,
            "last_60s": {
                "requests": summary.requests,
                "errors": summary.errors,
                "p95_ttft_s": summary.p95_ttft_s,
            },
            **self.source.describe(),
        }
