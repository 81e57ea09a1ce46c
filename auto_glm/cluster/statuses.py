"""Each live request's status as its engine sets it (waiting, running, preempted), for
whatever streams the engine's updates to another process: the engine process's outbox, a
Ray replica. The updates say nothing of a status (a prompt's chunks are prefilled before its
first token; a preempted request streams nothing), so the streaming side watches the
requests and sends, now and then, the ones whose status changed."""

from __future__ import annotations

import threading

from auto_glm.engine.request import Request, RequestStatus

__all__ = ["StatusWatch"]


class StatusWatch:
    """The statuses of the requests :meth:`watch` was given, as changes since last asked;
    thread-safe (requests are watched on one thread and read on another)."""

    def __init__(self) -> None:
        self._live: dict[str, Request] = {}
        self._sent: dict[str, RequestStatus] = {}  # each live request's status last told
        self._lock = threading.Lock()

    def watch(self, request: Request) -> None:
        """Tell ``request``'s status whenever it changed, until it finishes; the other side
        takes a new request as waiting."""
        with self._lock:
            self._live[request.request_id] = request
            self._sent[request.request_id] = RequestStatus.WAITING

    def forget(self, request_id: str) -> None:
        """Stop telling ``request_id``'s status (its stream ended before it finished)."""
        with self._lock:
            self._live.pop(request_id, None)
            self._sent.pop(request_id, None)

    def changed(self) -> list[tuple[str, str]]:
        """(request id, status) of the live requests whose status changed since the last
        call; the finished ones are dropped (their last update says so)."""
        changed, finished, sent = [], [], self._sent
        with self._lock:
            for request_id, request in self._live.items():
                status = request.status  # set by the engine's loop: read once
                if status is sent[request_id]:
                    continue
                if status is RequestStatus.FINISHED:
                    finished.append(request_id)
                else:
                    sent[request_id] = status
                    changed.append((request_id, status.value))
            for request_id in finished:
                del self._live[request_id], sent[request_id]
        return changed
