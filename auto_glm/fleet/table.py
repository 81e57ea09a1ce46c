"""The server's model table: served names -> versions -> engines, and how requests reach them.

:meth:`ModelTable.route` picks a version by the model's :class:`Traffic` and hands out a
:class:`Lease`; a version that is not loaded (idle past ``keep_alive``) is verified and
loaded first while the request waits. :meth:`ModelTable.set_traffic` loads and verifies
the versions it names before any request moves to them; a version that loses its traffic
finishes what it holds and is then unloaded (a hot swap). A canary that breaks its
:class:`RollbackRule` loses its traffic to the stable version on the spot.

Everything but the outcome bookkeeping runs on the server's event loop; the engines' finish
listeners (output threads) only add outcomes and, for a breach, hand the rollback to it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterator
from datetime import datetime, timezone
from typing import Any

from auto_glm.engine.client import EngineClient, FinishListener
from auto_glm.engine.inputs import RequestInputError
from auto_glm.engine.outputs import RequestOutput
from auto_glm.engine.request import Request
from auto_glm.fleet.canary import breach
from auto_glm.fleet.errors import ModelUnavailable, UnknownModel
from auto_glm.fleet.loading import LoadHook, VersionLoader
from auto_glm.fleet.model import Lease, RollbackEvent, ServedModel
from auto_glm.fleet.sources import EngineSource, LoadSettings, VersionSource
from auto_glm.fleet.traffic import Traffic
from auto_glm.fleet.version import ServedVersion

__all__ = ["ModelTable"]

log = logging.getLogger("auto_glm.fleet")
VersionLookup = Callable[[str, str], VersionSource]  # (model, version) -> source; blocking


class ModelTable:
    """Create it, :meth:`add` models, :meth:`load_initial` before serving, then
    :meth:`attach` on the serving loop; :meth:`close` unloads everything.

    ``lookup`` finds versions that traffic names but :meth:`add` did not (the registry);
    ``kv_cache_memory`` is split between the models by their ``kv_share``, or without it
    each takes its share of ``kv_cache_fraction`` of the memory free when it loads.
    """

    def __init__(
        self,
        settings: LoadSettings | None = None,
        lookup: VersionLookup | None = None,
        kv_cache_memory: int | None = None,
        kv_cache_fraction: float = 0.5,
    ) -> None:
        self.lookup = lookup
        self.kv_cache_memory = kv_cache_memory
        self.kv_cache_fraction = kv_cache_fraction
        self.models: dict[str, ServedModel] = {}
        self.loader = VersionLoader(settings or LoadSettings(), self._kv_split, self._listener)
        self.closing: list[Callable[[], None]] = []  # run by close(), e.g. the registry's
        self._loop: asyncio.AbstractEventLoop | None = None
        self._reaper: asyncio.Task[None] | None = None

    @classmethod
    def single(cls, name: str, engine: EngineClient, version: str = "local") -> ModelTable:
        """A table serving one engine that the caller built (``GLMService(GLMModel(...))``)."""
        table = cls()
        table.add(name, [EngineSource(engine, version)])
        table.loader.adopt(table.models[name].versions[version], engine)
        return table

    # ---- set-up ------------------------------------------------------------------------
    def add(
        self,
        name: str,
        sources: list[VersionSource],
        keep_alive: float | None = None,
        kv_share: float = 1.0,
    ) -> ServedModel:
        """Serve ``name``; its first source gets all traffic."""
        if name in self.models:
            raise ValueError(f"model {name!r} is served twice; give each --serve a new name")
        model = ServedModel(name, keep_alive, kv_share)
        for source in sources:
            model.versions[source.version] = ServedVersion(name, source)
        model.traffic = Traffic.single(sources[0].version)
        self.models[name] = model
        return model

    def on_loaded(self, hook: LoadHook) -> None:
        """Call ``hook(version, engine)`` for every engine loaded from now on and already."""
        self.loader.hooks.append(hook)
        for served in self.loaded():
            hook(served, served.engine)  # type: ignore[arg-type]

    def load_initial(self) -> None:
        """Load every version that has traffic, in the calling thread (before serving)."""
        for model in self.models.values():
            for version in model.traffic.weights:  # type: ignore[union-attr]
                served = model.versions[version]
                if not served.ready:
                    self.loader.adopt(served, self.loader.build(served))

    def attach(self, loop: asyncio.AbstractEventLoop) -> None:
        """Start serving on ``loop``: idle unloads and rollbacks run there."""
        self._loop = loop
        if any(m.keep_alive for m in self.models.values()) and self._reaper is None:
            self._reaper = loop.create_task(self._reap())

    def close(self) -> None:
        """Unload every engine (blocking); the table serves nothing afterwards."""
        if self._reaper is not None:
            self._reaper.cancel()
        self.loader.close([v for m in self.models.values() for v in m.versions.values()])
        for close in self.closing:
            close()

    # ---- reading -----------------------------------------------------------------------
    @property
    def default_model(self) -> str:
        """The model of requests that name none: the first one served."""
        return next(iter(self.models))

    def model(self, name: str) -> ServedModel:
        try:
            return self.models[name]
        except KeyError:
            raise UnknownModel(name, list(self.models)) from None

    def loaded(self) -> Iterator[ServedVersion]:
        for model in self.models.values():
            for served in model.versions.values():
                if served.ready:
                    yield served

    @property
    def all_alive(self) -> bool:
        return all(served.engine.is_alive for served in self.loaded())  # type: ignore[union-attr]

    def describe(self) -> list[dict[str, Any]]:
        return [model.describe() for model in self.models.values()]

    # ---- routing -----------------------------------------------------------------------
    async def route(self, name: str, key: str | None = None) -> Lease:
        """A lease on the version that serves this request; waits for a load if needed.

        Raises :class:`UnknownModel` or :class:`ModelUnavailable` (the load failed)."""
        model = self.model(name)
        while True:
            traffic = model.traffic
            served = model.versions[traffic.pick(key, lambda v: model.versions[v].load())]
            if not served.ready:
                try:
                    await self.loader.ensure_loaded(served)
                except ModelUnavailable as exc:
                    if served.version not in traffic.canaries:
                        raise
                    self._rollback(model, traffic, served.version, f"cannot load: {exc.reason}")
                continue  # the traffic may have moved while this request waited
            if not served.engine.is_alive and served.version in traffic.canaries:
                self._rollback(model, traffic, served.version, "its engine loop died")
                continue
            served.in_flight += 1
            served.last_used = time.monotonic()
            return Lease(served, self._released)

    def _released(self, served: ServedVersion) -> None:
        served.in_flight -= 1
        served.last_used = time.monotonic()
        if not served.in_flight:
            self._retire_unused(self.models[served.model])

    # ---- traffic -----------------------------------------------------------------------
    async def set_traffic(self, name: str, traffic: Traffic) -> None:
        """Load and verify every version ``traffic`` names, then move requests to them."""
        model = self.model(name)
        for version in traffic.weights:
            if version not in model.versions:
                source = await self._lookup(name, version)
                # a call that named it meanwhile added it first: share its one load
                model.versions.setdefault(version, ServedVersion(name, source))
        for version in traffic.weights:
            await self.loader.ensure_loaded(model.versions[version])
        for version in traffic.canaries:  # a canary is judged on requests under this rule
            model.versions[version].outcomes.clear()
        previous, model.traffic = model.traffic, traffic
        log.info(
            "traffic of %s: %s (was %s)",
            name,
            _weights_text(traffic),
            "none" if previous is None else _weights_text(previous),
        )
        self._retire_unused(model)

    async def _lookup(self, name: str, version: str) -> VersionSource:
        if self.lookup is None:
            raise UnknownModel(
                name,
                list(self.models),
                f"{name}@{version} is not loaded and this server has no model registry; "
                "start it with --registry and --serve",
            )
        return await asyncio.get_running_loop().run_in_executor(None, self.lookup, name, version)

    def _rollback(self, model: ServedModel, traffic: Traffic, version: str, reason: str) -> None:
        """Give all of ``traffic``'s weight to its stable version (loop or output thread)."""
        if model.traffic is not traffic or version not in traffic.canaries:
            return  # already rolled back, or the traffic changed meanwhile
        model.traffic = Traffic({traffic.stable: 1.0}, sticky=traffic.sticky, policy=traffic.policy)
        model.rollbacks.append(
            RollbackEvent(datetime.now(timezone.utc), version, traffic.stable, reason)
        )
        model.rollback_counts[version] += 1
        log.warning(
            "rolled back %s@%s: %s; all traffic goes to %s@%s",
            model.name,
            version,
            reason,
            model.name,
            traffic.stable,
        )
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._retire_unused, model)

    def _listener(self, served: ServedVersion) -> FinishListener:
        """Runs on the engine's output thread: records the outcome, judges a canary."""

        def on_finish(
            request: Request, output: RequestOutput | None, error: BaseException | None
        ) -> None:
            m = request.metrics
            ttft = None if m.first_token_time is None else m.first_token_time - m.arrival_time
            # a request ended for its own input is no fault of the version
            failed = error is not None and not isinstance(error, RequestInputError)
            served.outcomes.add(failed, ttft)
            model = self.models[served.model]
            traffic = model.traffic
            rule = None if traffic is None else traffic.rollback
            if rule is None or served.version not in traffic.canaries:
                return
            reason = breach(rule, served.outcomes)
            if reason is not None:
                self._rollback(model, traffic, served.version, reason)

        return on_finish

    # ---- memory ------------------------------------------------------------------------
    def _kv_split(self, served: ServedVersion) -> tuple[int | None, float]:
        model = self.models[served.model]
        share = model.kv_share / sum(m.kv_share for m in self.models.values())
        if self.kv_cache_memory is not None:
            return int(self.kv_cache_memory * share), self.kv_cache_fraction
        return None, self.kv_cache_fraction * share

    def _retire_unused(self, model: ServedModel) -> None:
        """Unload every loaded version without traffic and without requests in flight."""
        for served in model.versions.values():
            idle = served.ready and not served.in_flight
            if idle and model.weight(served.version) == 0 and served.source.reloadable:
                self.loader.unload(served, "it has no traffic and nothing in flight")

    async def _reap(self) -> None:
        shortest = min(m.keep_alive for m in self.models.values() if m.keep_alive)
        while True:
            await asyncio.sleep(min(max(shortest / 4, 0.05), 1.0))
            now = time.monotonic()
            for model in self.models.values():
                for served in model.versions.values():
                    idle = now - served.last_used
                    if (
                        model.keep_alive
                        and served.ready
                        and not served.in_flight
                        and served.source.reloadable
                        and idle >= model.keep_alive
                    ):
                        self.loader.unload(
                            served,
                            f"idle for {idle:.0f} s (keep_alive={model.keep_alive:g} s); the "
                            "next request loads it again",
                        )


def _weights_text(traffic: Traffic) -> str:
    return ", ".join(f"{v}={w:g}" for v, w in traffic.weights.items())
