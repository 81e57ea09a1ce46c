"""The engine process's side of ``engine_process``: one engine, driven over a pipe.

:func:`run_engine` is the child's whole life. It builds the engine, says it is ready (or why
it failed), then takes the parent's messages on its main thread (submit, abort, stop) while
an outbox thread sends what the engine's output thread delivers: every update waiting when
the outbox wakes goes in one message, a request's consecutive updates joined into one
:mod:`.wire` chunk, so a decode step of 256 streams costs one pipe write, not 256.
The engine's counters ride along at least every :data:`STATS_EVERY_S` (and with every
request's end), so the parent reads them without asking; so does each request's status
when it changed (scheduled, preempted), so the parent's admission counts as waiting exactly
the requests that wait here, also while a prompt's chunks are prefilled, before any token.

The child ends when the parent says stop or goes away (the pipe closes, or, while the
engine is still being built, the parent's process is gone); when its engine loop dies it
says so, so a request never waits on an engine that is gone. It logs as the parent does.
"""

from __future__ import annotations

import os
import pickle
import queue
import signal
import sys
import threading
import time
from dataclasses import asdict
from multiprocessing.connection import Connection
from typing import Any

from auto_glm.cluster.pipe import dumps, portable
from auto_glm.cluster.statuses import StatusWatch
from auto_glm.cluster.streamed import describe_engine
from auto_glm.cluster.wire import chunk_of
from auto_glm.engine.client import EngineClient
from auto_glm.engine.outputs import RequestOutput

__all__ = ["STATS_EVERY_S", "run_engine"]

STATS_EVERY_S = 0.5
_Item = tuple[str, RequestOutput | BaseException]


class _Outbox:
    """Sends the engine's updates to the parent, every waiting one in one message."""

    def __init__(self, conn: Connection, engine: EngineClient) -> None:
        self.conn, self.engine = conn, engine
        self.items: queue.SimpleQueue[_Item | None] = queue.SimpleQueue()
        self._stats_at = 0.0
        self.statuses = StatusWatch()  # whose changes ride along with each message
        self._thread = threading.Thread(target=self._run, name="autoglm-outbox", daemon=True)
        self._thread.start()

    def put(self, request_id: str, item: RequestOutput | BaseException) -> None:
        self.items.put((request_id, item))

    def close(self) -> None:
        self.items.put(None)
        self._thread.join(timeout=10)

    def _run(self) -> None:
        while True:
            try:
                first = self.items.get(timeout=STATS_EVERY_S)
            except queue.Empty:  # idle: the counters and the engine's health, still
                if not self._send([], heartbeat=True):
                    return
                continue
            batch = [first]
            while True:
                try:
                    batch.append(self.items.get_nowait())
                except queue.Empty:
                    break
            done = None in batch
            if not self._send([item for item in batch if item is not None]) or done:
                return

    def _send(self, items: list[_Item], heartbeat: bool = False) -> bool:
        """One message of ``items``; False once the parent is gone."""
        chunks: dict[str, list[RequestOutput]] = {}
        entries: list[tuple[str, Any]] = []
        finished = False
        for request_id, item in items:
            if isinstance(item, BaseException):
                entries.append((request_id, portable(item)))
                finished = True
                continue
            updates = chunks.get(request_id)
            if updates is None:
                chunks[request_id] = updates = []
                entries.append((request_id, updates))
            updates.append(item)
            finished = finished or item.finished
        wire = [
            (rid, e if isinstance(e, BaseException) else chunk_of(e, "", None))
            for rid, e in entries
        ]
        now = time.monotonic()
        stats = None
        if finished or heartbeat or now - self._stats_at >= STATS_EVERY_S:
            self._stats_at = now
            stats = asdict(self.engine.stats())
        try:
            message = ("out", wire, stats, self.engine.is_alive, self.statuses.changed())
            self.conn.send_bytes(dumps(message))
        except (BrokenPipeError, OSError):
            return False
        return True


def _submit(engine: EngineClient, outbox: _Outbox, payload: dict[str, Any]) -> None:
    request_id = payload["request_id"]
    try:
        request = engine.submit(
            payload["prompt"],
            payload["params"],
            lambda item: outbox.put(request_id, item),
            request_id=request_id,
            priority=payload["priority"],
            cache_salt=payload["cache_salt"],
            tenant=payload["tenant"],
            weight=payload["weight"],
        )
    except Exception as exc:  # refused before it ran: the parent raises it to its caller
        outbox.put(request_id, exc)
        return
    outbox.statuses.watch(request)


def _orphaned(parent: int) -> None:
    """End this process once its parent is gone, even mid-build (it cannot be told)."""
    while os.getppid() == parent:
        time.sleep(1.0)
    os._exit(1)


def run_engine(conn: Connection) -> None:
    """The engine process: take the parent's ``sys.path`` and build callable, ``build()``
    the engine, then serve the parent over ``conn``."""
    # Ctrl-C and a service manager's SIGTERM reach the whole process group: the parent
    # drains its requests first, then stops this process (`stop`)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    threading.Thread(target=_orphaned, args=(os.getppid(),), daemon=True).start()
    try:
        path, logs, build = pickle.loads(conn.recv_bytes())
        sys.path[:] = path
        if logs is not None:  # the parent's, which is a server's
            from auto_glm.observability.logging import setup_logging

            setup_logging(*logs)
        engine = pickle.loads(build)()
    except BaseException as exc:
        conn.send_bytes(dumps(("failed", portable(exc))))
        return
    conn.send_bytes(dumps(("ready", describe_engine(engine))))
    outbox = _Outbox(conn, engine)
    try:
        while True:
            try:
                kind, body = pickle.loads(conn.recv_bytes())
            except (EOFError, OSError):  # the parent is gone
                break
            if kind == "submit":
                _submit(engine, outbox, body)
            elif kind == "abort":
                engine.abort(body)
            elif kind == "stop":
                break
    finally:
        engine.shutdown()  # ends what is left with an error, through the outbox
        outbox.close()


if __name__ == "__main__":  # started by ProcessEngineClient.start, with its socket's fd
    run_engine(Connection(int(sys.argv[1])))
