"""An engine client whose engine is a Ray Serve deployment: what the ingress serves from.

It offers the part of :class:`~auto_glm.engine.client.EngineClient` that the front end
uses (encode, the sampling checks, submit, abort, stats, finish listeners), so admission,
tenancy, the REST and gRPC adapters and the metrics run unchanged in the ingress. Each
request is one streaming call to the engine deployment; the router picks a replica by
prefix affinity (the ``affinity`` key: the tenant and the prompt's first blocks).

A request whose replica fails before it streamed anything is sent again (the router then
picks a live replica); one that fails mid-stream ends with an error naming the replica, as
its tokens cannot be taken back.
"""

from __future__ import annotations

import asyncio
import contextvars
import hashlib
import logging
import time
from dataclasses import dataclass
from typing import Any

from auto_glm.cluster.streamed import Accumulator, StreamedEngineClient
from auto_glm.cluster.wire import stats_of
from auto_glm.engine.client import EngineRequestError, Sink
from auto_glm.engine.core import EngineStats
from auto_glm.engine.inputs import EngineInput, RequestInputError
from auto_glm.engine.request import Caller, Request
from auto_glm.sampling_params import SamplingParams

__all__ = ["RemoteEngineClient", "affinity_key"]

log = logging.getLogger("auto_glm.cluster")
RETRIES = 3  # sends of a request that no replica has started yet
_STALE_S = 60.0  # a replica not heard from for this long is no longer reported
_RETRYABLE = (
    "ActorDiedError",
    "ActorUnavailableError",
    "RayActorError",
    "ActorUnschedulableError",
    "DeploymentUnavailableError",
)


def affinity_key(tenant: str | None, prompt: list[int], tokens: int) -> str:
    """Requests with the same tenant and the same first ``tokens`` prompt tokens share it."""
    head = ",".join(map(str, prompt[:tokens]))
    return hashlib.sha256(f"{tenant or ''}|{head}".encode()).hexdigest()[:16]


@dataclass
class _Snapshot:
    stats_value: EngineStats
    at: float

    def stats(self) -> EngineStats:
        return self.stats_value


class RemoteEngineClient(StreamedEngineClient):
    def __init__(self, handle: Any, info: dict[str, Any]) -> None:
        super().__init__(info)  # num_blocks, kv_cache_bytes: of one replica
        self.handle = handle.options(stream=True)
        self.affinity_tokens = 4 * self.config.block_size
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._replicas: dict[str, _Snapshot] = {}

    # ---- what the front end reads ----------------------------------------------------
    @property
    def is_alive(self) -> bool:
        return True  # Serve replaces dead replicas; a failed call ends with its own error

    def replica_stats(self) -> dict[str, _Snapshot]:
        """The last counters each replica reported (within a minute), by replica id."""
        now = time.monotonic()
        return {r: s for r, s in self._replicas.items() if now - s.at < _STALE_S}

    def stats(self) -> EngineStats:
        """The replicas' counters added up (KV usage: their mean)."""
        snapshots = [s.stats() for s in self.replica_stats().values()]
        if not snapshots:
            return EngineStats(0, 0, 0.0, 0, 0, 0, 0, 0, 0.0, 0.0, 0.0)
        total = {f: sum(getattr(s, f) for s in snapshots) for f in EngineStats.__annotations__}
        total["kv_usage"] /= len(snapshots)
        return EngineStats(**total)

    # ---- requests ----------------------------------------------------------------------
    def submit(
        self,
        prompt: str | list[int] | EngineInput,
        params: SamplingParams,
        sink: Sink,
        request_id: str | None = None,
        priority: int = 0,
        cache_salt: str | None = None,
        caller: Caller | None = None,
        tenant: str | None = None,
        weight: float = 1.0,
    ) -> Request:
        ids, images = self.checked_input(prompt)
        request_id = request_id or f"req-{time.monotonic_ns()}"
        request = Request(
            request_id,
            ids,
            params,
            priority=priority,
            cache_salt=cache_salt,
            caller=caller,
            tenant=tenant,
            weight=weight,
        )
        payload = {
            "request_id": request_id,
            "prompt": EngineInput(ids, images) if images else ids,  # images as tensors
            "params": params,
            "priority": priority,
            "cache_salt": cache_salt,
            "tenant": tenant,
            "weight": weight,
        }
        key = affinity_key(cache_salt, ids, self.affinity_tokens)
        task = asyncio.get_running_loop().create_task(self._run(request, payload, key, sink))
        self._tasks[request_id] = task
        task.add_done_callback(lambda _: self._tasks.pop(request_id, None))
        return request

    def abort(self, request_id: str) -> None:
        task = self._tasks.get(request_id)
        if task is not None:
            task.cancel()

    def shutdown(self) -> None:
        for task in list(self._tasks.values()):
            task.cancel()

    async def _run(self, request: Request, payload: dict, key: str, sink: Sink) -> None:
        output = Accumulator(request)
        for attempt in range(1, RETRIES + 1):
            response = None
            try:
                # Made in an empty context, so that Serve sees a call of its own: in the
                # HTTP request's context, every call of one request (n choices, a list of
                # prompts) took that request's internal id, and Serve's router, which hands
                # a replica to the waiting call with that id, left all but one waiting.
                response = contextvars.Context().run(
                    self.handle.generate.remote, payload, affinity=key
                )
                async for chunk in response:
                    if "status" in chunk:
                        output.status_is(chunk["status"])
                        continue
                    if "error" in chunk:
                        error = chunk["error"]
                        if chunk.get("code") is not None:
                            failure = RequestInputError(error, chunk["code"])
                        elif chunk["invalid"]:
                            failure = ValueError(error)
                        else:
                            failure = EngineRequestError(f"replica {chunk['replica']}: {error}")
                        self._finish(request, None, failure, sink)
                        return
                    if (stats := stats_of(chunk)) is not None:
                        self._replicas[chunk["replica"]] = _Snapshot(stats, time.monotonic())
                    try:
                        update = output.add(chunk)
                        sink(update)
                    except Exception as exc:  # one bad stream must not stall the others
                        log.exception("delivering output of %s failed", request.request_id)
                        response.cancel()  # nobody reads it any more: the replica aborts it
                        self._finish(request, None, exc, sink)
                        return
                    if update.finished:
                        self._finish(request, update, None, None)
                        return
                raise EngineRequestError("the replica ended the stream before the request finished")
            except asyncio.CancelledError:  # aborted by the caller: the replica aborts it too
                if response is not None:
                    response.cancel()
                self._finish(request, output.aborted(), None, None)
                raise
            except Exception as exc:
                retry = not output.started and type(exc).__name__ in _RETRYABLE
                if retry and attempt < RETRIES:
                    output.status_is("waiting")  # until the next replica schedules it
                    log.warning(
                        "request %s: its replica failed before streaming (%s); sending it again",
                        request.request_id,
                        type(exc).__name__,
                    )
                    await asyncio.sleep(0.2 * attempt)
                    continue
                where = f"replica {request.replica}" if request.replica else "its replica"
                state = (
                    "after streaming part of the reply" if output.started else "before it started"
                )
                failure = EngineRequestError(
                    f"{where} failed {state} ({type(exc).__name__}: {exc}); retry the request"
                )
                self._finish(request, None, failure, sink)
                return
