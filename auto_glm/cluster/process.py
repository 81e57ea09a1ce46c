"""An engine in a child process of the server (``engine_process``).

In one process, the HTTP event loop, the engine loop and the engine's output thread take
turns under one GIL, so a server streaming a large batch is bound by their CPU time added
up, not by the device's step. With ``engine_process`` the engine loop and its output thread
(detokenizing, stop strings) run in a child process (:mod:`.process_main`, a fresh
interpreter started by :mod:`.pipe`), and the server's process keeps the front end:
tokenizing, chat templates, image preprocessing, grammar checks, admission and the HTTP
streams.

:class:`ProcessEngineClient` is the front end's engine there. A reader thread takes the
child's messages (all the updates of a step in one), turns each request's chunk back into
its cumulative update and hands it to the request's sink, as the output thread does in
process, and keeps each request's status the engine's (waiting, running, preempted), which
admission counts. When the child dies, every request it held ends with an
:class:`~auto_glm.engine.core.EngineDeadError` naming its exit code, and so does every
later submit.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import pickle
import subprocess
import threading
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

from auto_glm.cluster.pipe import dumps, spawn
from auto_glm.cluster.streamed import Accumulator, StreamedEngineClient, deliver
from auto_glm.engine.client import EngineClient, Sink
from auto_glm.engine.core import EngineDeadError, EngineStats
from auto_glm.engine.heap import freeze_heap, thaw_heap
from auto_glm.engine.inputs import EngineInput
from auto_glm.engine.request import Caller, Request
from auto_glm.sampling_params import SamplingParams

__all__ = ["ProcessEngineClient"]

log = logging.getLogger("auto_glm.cluster")


@dataclass
class _Stream:
    request: Request
    sink: Sink
    output: Accumulator


class ProcessEngineClient(StreamedEngineClient):
    """The front end's client of an engine in a child process; see :meth:`start`."""

    def __init__(
        self,
        process: subprocess.Popen,
        conn: Connection,
        info: dict[str, Any],
    ) -> None:
        super().__init__(info)
        self.process, self.conn = process, conn
        self._stats = EngineStats(0, 0, 0.0, 0, 0, 0, 0, 0, 0.0, 0.0, 0.0)
        self._streams: dict[str, _Stream] = {}
        self._lock = threading.Lock()  # the streams
        self._writing = threading.Lock()  # the pipe's writing end
        self._ids = itertools.count()
        self._dead: str | None = None  # why the engine can take no more requests
        self._reader = threading.Thread(target=self._read, name="autoglm-engine-pipe", daemon=True)
        freeze_heap()  # this process's event loop must not stall on full collections either
        self._reader.start()

    @classmethod
    def start(
        cls, build: Callable[[], EngineClient], name: str, fds: tuple[int, ...] = ()
    ) -> ProcessEngineClient:
        """Start an engine process that runs ``build()`` (see :func:`.pipe.spawn`; it
        inherits ``fds``) and return its client once the engine is ready. Raises what the
        build raised there (the model's load errors keep their type)."""
        process, conn, info = spawn(build, name, fds)
        log.info("engine of %s runs in process %d", name, process.pid)
        try:
            return cls(process, conn, info)
        except BaseException:  # e.g. interrupted here: the engine there must not outlive it
            process.kill()
            process.wait(timeout=30)
            raise

    # ---- what the front end reads ----------------------------------------------------
    @property
    def is_alive(self) -> bool:
        return self._dead is None

    def stats(self) -> EngineStats:
        """The engine's counters as the child last sent them (at most half a second ago
        while it runs, and with every request's end)."""
        return self._stats

    def replica_stats(self) -> dict[str, ProcessEngineClient]:
        return {"": self}

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
        """Check and send a request; raises ValueError (bad input) before anything is sent."""
        ids, images = self.checked_input(prompt)
        self.check_sampling(params)
        request = Request(
            request_id or f"req-{next(self._ids)}",
            ids,
            params,
            priority=priority,
            cache_salt=cache_salt,
            caller=caller,
            tenant=tenant,
            weight=weight,
        )
        payload = {
            "request_id": request.request_id,
            "prompt": EngineInput(ids, images) if images else ids,
            "params": params,
            "priority": priority,
            "cache_salt": cache_salt,
            "tenant": tenant,
            "weight": weight,
        }
        with self._lock:  # the reader ends every stream it finds once the child is gone
            if self._dead is not None:
                raise EngineDeadError(self._dead)
            if request.request_id in self._streams:
                raise ValueError(f"request id {request.request_id!r} is already in use")
            self._streams[request.request_id] = _Stream(request, sink, Accumulator(request))
        self._send(("submit", payload))
        return request

    def abort(self, request_id: str) -> None:
        """End the request now: its caller gets nothing more, the listeners its output so
        far, and the child frees its KV blocks."""
        with self._lock:
            stream = self._streams.pop(request_id, None)
        if stream is not None:
            self._send(("abort", request_id))
            self._finish(stream.request, stream.output.aborted(), None, None)

    def shutdown(self) -> None:
        """Stop the engine process; what it still held ends with an error."""
        self._send(("stop", None))
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            log.warning("the engine process %d did not stop; killing it", self.process.pid)
            self.process.kill()
            self.process.wait(timeout=10)
        self._reader.join(timeout=10)
        self.conn.close()
        thaw_heap()

    def _send(self, message: tuple[str, Any]) -> None:
        """Write to the child; a child already gone is the reader's news."""
        data = dumps(message)
        with self._writing, contextlib.suppress(BrokenPipeError, OSError):
            self.conn.send_bytes(data)

    # ---- the reader thread ---------------------------------------------------------------
    def _read(self) -> None:
        while True:
            try:
                _, items, stats, alive, statuses = pickle.loads(self.conn.recv_bytes())  # "out"
            except (EOFError, OSError):
                break
            if stats is not None:
                self._stats = EngineStats(**stats)
            for request_id, item in items:
                try:
                    self._deliver(request_id, item)
                except Exception as exc:  # one bad stream must not stall the others
                    log.exception("delivering output of %s failed", request_id)
                    self._end(request_id, exc)
                    self._send(("abort", request_id))  # nobody reads it any more
            for request_id, status in statuses:  # newer than the message's updates
                if (stream := self._streams.get(request_id)) is not None:
                    stream.output.status_is(status)
            if not alive and self._dead is None:
                self._dead = "the engine loop in the engine process has stopped; restart the server"
        try:
            code = self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:  # it closed its end but still runs: end it
            self.process.kill()
            code = self.process.wait(timeout=10)
        with self._lock:
            self._dead = f"the engine process exited (code {code}); restart the server"
            left, self._streams = list(self._streams.values()), {}
        for stream in left:
            self._finish(stream.request, None, EngineDeadError(self._dead), stream.sink)

    def _deliver(self, request_id: str, item: dict[str, Any] | BaseException) -> None:
        stream = self._streams.get(request_id)
        if stream is None:
            return  # aborted here already
        if isinstance(item, BaseException):
            self._end(request_id, item)
            return
        update = stream.output.add(item)
        if update.finished:
            with self._lock:
                self._streams.pop(request_id, None)
        deliver(stream.sink, update, request_id)
        if update.finished:
            self._finish(stream.request, update, None, None)

    def _end(self, request_id: str, error: BaseException) -> None:
        with self._lock:
            stream = self._streams.pop(request_id, None)
        if stream is not None:
            self._finish(stream.request, None, error, stream.sink)
