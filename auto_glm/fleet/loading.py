"""Building and shutting down the engines of served versions, off the event loop.

Loads run one at a time in a worker thread (a version is verified, then loaded), so two
big checkpoints never compete for memory; requests for a version that is loading share
its one load. Shutdowns go through the same thread, so a swapped-out engine's memory is
freed before the next load starts: once the thread holds it no more, a collection frees
what it left in reference cycles, and the engines still running get their frozen heap
back (see :mod:`auto_glm.engine.heap`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from auto_glm.engine.client import EngineClient, FinishListener
from auto_glm.engine.heap import collect_and_freeze
from auto_glm.fleet.errors import ModelUnavailable
from auto_glm.fleet.sources import LoadSettings
from auto_glm.fleet.version import ServedVersion, VersionState

__all__ = ["LoadHook", "VersionLoader"]

log = logging.getLogger("auto_glm.fleet")
LoadHook = Callable[[ServedVersion, EngineClient], None]


class VersionLoader:
    """``kv_split(version) -> (kv_cache_memory, kv_cache_fraction)`` sizes each engine's
    KV cache; ``listener(version)`` is attached to every engine it builds."""

    def __init__(
        self,
        settings: LoadSettings,
        kv_split: Callable[[ServedVersion], tuple[int | None, float]],
        listener: Callable[[ServedVersion], FinishListener],
    ) -> None:
        self.settings = settings
        self.kv_split = kv_split
        self.listener = listener
        self.hooks: list[LoadHook] = []
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="autoglm-load")

    def build(self, served: ServedVersion) -> EngineClient:
        """Verify and load ``served`` in the calling thread; returns its engine."""
        memory, fraction = self.kv_split(served)
        return served.source.load(served.ref, self.settings.engine_config(memory, fraction))

    def adopt(self, served: ServedVersion, engine: EngineClient) -> None:
        """Make ``engine`` the version's: listeners first, then it takes requests."""
        engine.add_finish_listener(self.listener(served))
        served.mark_loaded(engine)
        for hook in self.hooks:
            hook(served, engine)

    async def ensure_loaded(self, served: ServedVersion) -> None:
        """Return once ``served`` is ready; raise :class:`ModelUnavailable` if it cannot be."""
        if served.ready:
            return
        if served.loading is None:
            served.loading = asyncio.get_running_loop().create_task(self._load(served))
        await asyncio.shield(served.loading)

    async def _load(self, served: ServedVersion) -> None:
        served.state = VersionState.LOADING
        start = time.monotonic()
        log.info("loading %s on demand", served.ref)
        try:
            engine = await asyncio.get_running_loop().run_in_executor(
                self._pool, self.build, served
            )
        except Exception as exc:
            served.state, served.error = VersionState.FAILED, str(exc)
            log.error("cannot load %s: %s", served.ref, exc)
            raise ModelUnavailable(served.ref, str(exc)) from exc
        finally:
            served.loading = None
        self.adopt(served, engine)
        log.info("%s is ready (%.2f s)", served.ref, time.monotonic() - start)

    def unload(self, served: ServedVersion, why: str) -> None:
        """Detach the engine now and shut it down in the worker thread."""
        log.info("unloading %s: %s", served.ref, why)
        engine = served.take_engine()
        if engine is not None:
            self._pool.submit(engine.shutdown)
            del engine  # the worker's is the last reference, dropped before the collection
            self._pool.submit(collect_and_freeze)

    def close(self, versions: list[ServedVersion]) -> None:
        """Shut down every engine of ``versions`` (blocking) and the worker thread."""
        for served in versions:
            engine = served.take_engine()
            if engine is not None:
                engine.shutdown()
        self._pool.shutdown(wait=True)
