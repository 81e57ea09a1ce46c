"""The engine deployment: one engine per Ray Serve replica.

A replica loads its model once (a registered version is verified first, as in a single
server), streams each request's updates back as :mod:`.wire` chunks (the updates that
piled up while the ingress was busy go out as one chunk), aborts a request
whose caller went away (the stream is closed), and answers Serve's health check only
while its engine loop runs, so Serve replaces a replica whose engine died.

Each request's status (running, preempted) is streamed too, when it changed, checked after
every step with updates and at least every :data:`STATUS_EVERY_S`: the ingress's admission
counts as waiting exactly the requests that wait in a replica's engine, also while a prompt
is prefilled, before its first token.
:class:`ReplicaStreams` is all of this but the model's loading and Serve's calls.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from auto_glm.cluster.statuses import StatusWatch
from auto_glm.cluster.streamed import describe_engine
from auto_glm.cluster.wire import chunk_of, error_chunk, status_chunk
from auto_glm.engine.client import EngineClient
from auto_glm.engine.outputs import RequestOutput
from auto_glm.fleet import LoadSettings, RegisteredSource
from auto_glm.sampling_params import SamplingParams

__all__ = ["STATUS_EVERY_S", "EngineReplica", "ReplicaSpec", "ReplicaStreams"]

log = logging.getLogger("auto_glm.cluster")
ReplicaSpec = dict[str, Any]  # see build_engine: model or registry entry, load settings
STATS_EVERY_S = 1.0
STATUS_EVERY_S = 0.25  # how often the live requests' statuses are checked for changes


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


class ReplicaStreams:
    """One engine's requests as streams of :mod:`.wire` chunks, on the caller's event loop."""

    def __init__(self, engine: EngineClient, replica: str) -> None:
        self.engine, self.replica = engine, replica
        self._stats_at = 0.0
        self._statuses = StatusWatch()
        self._updates: dict[str, asyncio.Queue] = {}  # each live request's, by engine id
        self._watcher: asyncio.Task | None = None
        self._stepped = asyncio.Event()  # set by every update: the engine took a step

    async def generate(self, request: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        """Stream one request's updates, and its status when it changed."""
        loop = asyncio.get_running_loop()
        updates: asyncio.Queue = asyncio.Queue()

        def deliver(item) -> None:
            updates.put_nowait(item)
            self._stepped.set()

        def sink(item) -> None:  # on the engine's output thread
            loop.call_soon_threadsafe(deliver, item)

        params: SamplingParams = request["params"]
        try:
            submitted = self.engine.submit(
                request["prompt"],
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
        request_id = submitted.request_id
        self._updates[request_id] = updates
        self._statuses.watch(submitted)
        if self._watcher is None or self._watcher.done():
            self._watcher = loop.create_task(self._tell_statuses())
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
                chunks, finished = self._chunks(batch)
                for chunk in chunks:
                    yield chunk
        finally:
            self._updates.pop(request_id, None)
            self._statuses.forget(request_id)
            if not finished:  # the ingress closed the stream: free the KV blocks now
                self.engine.abort(request_id)

    def _chunks(self, batch: list[RequestOutput | str]) -> tuple[list[dict[str, Any]], bool]:
        """Consecutive updates as one chunk each, a status between them as its own; and
        whether the request finished (what came after its last update is dropped)."""
        chunks: list[dict[str, Any]] = []
        outputs: list[RequestOutput] = []
        for item in batch:
            if isinstance(item, RequestOutput):
                outputs.append(item)
                if item.finished:
                    break
                continue
            if outputs:
                chunks.append(chunk_of(outputs, self.replica, self._stats(False)))
                outputs = []
            chunks.append(status_chunk(self.replica, item))
        finished = bool(outputs) and outputs[-1].finished
        if outputs:
            chunks.append(chunk_of(outputs, self.replica, self._stats(finished)))
        return chunks, finished

    async def _tell_statuses(self) -> None:
        """While requests live, after each step with updates and at least every
        STATUS_EVERY_S (a step may have none: prompt chunks): each changed status to its
        stream, ahead of the updates that come after it."""
        while self._updates:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stepped.wait(), STATUS_EVERY_S)
            self._stepped.clear()
            for request_id, status in self._statuses.changed():
                updates = self._updates.get(request_id)
                if updates is not None:
                    updates.put_nowait(status)

    def _stats(self, finished: bool):
        """The engine's counters on a request's last chunk, and at least once a second on
        long streams, so the ingress always has a recent view of this replica."""
        now = time.monotonic()
        if finished or now - self._stats_at >= STATS_EVERY_S:
            self._stats_at = now
            return self.engine.stats()
        return None


class EngineReplica:
    def __init__(self, spec: ReplicaSpec) -> None:
        from ray import serve

        self.replica = serve.get_replica_context().replica_id.unique_id
        self.engine = build_engine(spec)
        self.streams = ReplicaStreams(self.engine, self.replica)
        log.info("replica %s serves %s", self.replica, self.engine.loaded.path)

    def describe(self) -> dict[str, Any]:
        """What the ingress needs to tokenize, check limits and report this model."""
        return describe_engine(self.engine)

    async def generate(
        self, request: dict[str, Any], affinity: str = ""
    ) -> AsyncIterator[dict[str, Any]]:
        """Stream one request's updates; ``affinity`` is read by the router, not here."""
        async for chunk in self.streams.generate(request):
            yield chunk

    def check_health(self) -> None:
        """Serve's health check: a replica whose engine loop died is replaced."""
        if not self.engine.is_alive:
            raise RuntimeError(f"the engine loop of replica {self.replica} has stopped")

    def __del__(self) -> None:
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.shutdown()
