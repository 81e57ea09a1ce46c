"""The engine deployment: one engine per Ray Serve replica.

A replica loads its model once (a registered version is verified first, as in a single
server), streams each request's updates back as :mod:`.wire` chunks (the updates that
piled up while the ingress was busy go out as one chunk), aborts a request
whose caller went away (the stream is closed), and answers Serve's health check only
while its engine loop runs, so Serve replaces a replica whose engine died.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from auto_glm.cluster.streamed import describe_engine
from auto_glm.cluster.wire import chunk_of, error_chunk
from auto_glm.engine.client import EngineClient
from auto_glm.fleet import LoadSettings, RegisteredSource
from auto_glm.sampling_params import SamplingParams

__all__ = ["EngineReplica", "ReplicaSpec"]

log = logging.getLogger("auto_glm.cluster")
ReplicaSpec = dict[str, Any]  # see build_engine: model or registry entry, load settings
STATS_EVERY_S = 1.0


def build_engine(spec: ReplicaSpec) -> EngineClient:
    """The engine a replica serves: ``spec["model"]`` (a path or hub id) or a registered
    ``spec["registered"]`` = (name, version), with ``spec["settings"]`` (LoadSettings)."""
    settings: LoadSettings = spec["settings"]
    config = settings.engine_config(spec.get("kv_cache_memory"), 0.5)
    if spec.get("registered") is None:
        return settings.build(spec["model"], config)
    from auto_glm.registry import ModelRegistry

    name, version = spec["registered"]
    registry = ModelRegistry(spec.get("database_url"), spec.get("registry_dir"))
    try:
        entry = registry.get(name, version)
        return RegisteredSource(registry, entry, settings).load(entry.ref, config)
    finally:
        registry.close()


class EngineReplica:
    def __init__(self, spec: ReplicaSpec) -> None:
        from ray import serve

        self.replica = serve.get_replica_context().replica_id.unique_id
        self.engine = build_engine(spec)
        self._stats_at = 0.0
        log.info("replica %s serves %s", self.replica, self.engine.loaded.path)

    def describe(self) -> dict[str, Any]:
        """What the ingress needs to tokenize, check limits and report this model."""
        return describe_engine(self.engine)

    async def generate(
        self, request: dict[str, Any], affinity: str = ""
    ) -> AsyncIterator[dict[str, Any]]:
        """Stream one request's updates; ``affinity`` is read by the router, not here."""
        loop = asyncio.get_running_loop()
        updates: asyncio.Queue = asyncio.Queue()

        def sink(item) -> None:  # on the engine's output thread
            loop.call_soon_threadsafe(updates.put_nowait, item)

        params: SamplingParams = request["params"]
        try:
            submitted = self.engine.submit(
                request["prompt_token_ids"],
                params,
                sink,
                request_id=f"{request['request_id']}-{uuid.uuid4().hex[:8]}",  # per attempt
                priority=request["priority"],
                cache_salt=request["cache_salt"],
                tenant=request["tenant"],
                weight=request["weight"],
            )
        except Exception as exc:  # refused before it ran: the caller's error, not the replica's
            yield error_chunk(self.replica, exc)
            return
        finished = False
        try:
            while not finished:
                batch = [await updates.get()]
                while not updates.empty():  # a slow reader gets every waiting update at once
                    batch.append(updates.get_nowait())
                failure = next((i for i in batch if isinstance(i, BaseException)), None)
                if failure is not None:
                    finished = True
                    yield error_chunk(self.replica, failure)
                    return
                finished = batch[-1].finished
                yield chunk_of(batch, self.replica, self._stats(finished))
        finally:
            if not finished:  # the ingress closed the stream: free the KV blocks now
                self.engine.abort(submitted.request_id)

    def _stats(self, finished: bool):
        """The engine's counters on a request's last chunk, and at least once a second on
        long streams, so the ingress always has a recent view of this replica."""
        now = time.monotonic()
        if finished or now - self._stats_at >= STATS_EVERY_S:
            self._stats_at = now
            return self.engine.stats()
        return None

    def check_health(self) -> None:
        """Serve's health check: a replica whose engine loop died is replaced."""
        if not self.engine.is_alive:
            raise RuntimeError(f"the engine loop of replica {self.replica} has stopped")

    def __del__(self) -> None:
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.shutdown()
