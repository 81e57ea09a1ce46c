"""What one API call learns about its engine requests, and how handlers hand it to the engine.

The middleware (or the gRPC interceptor) opens an :class:`Exchange` per call; a handler that
submits N engine requests passes ``caller=expecting(exchange, N)`` to each
``EngineClient.submit``; the engine's finish listener finds the exchange in
``Request.caller`` and adds tokens and time to first token, which end up in the access log
line and the server span.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from dataclasses import dataclass, field

from opentelemetry.context import Context
from starlette.requests import Request as HttpRequest

__all__ = ["TAG", "Exchange", "exchange_of", "expecting"]

TAG = "autoglm.exchange"  # key in the ASGI scope's state


@dataclass
class Exchange:
    """One API call: an engine request's :class:`~auto_glm.engine.request.Caller`."""

    request_id: str
    otel_context: Context
    loop: asyncio.AbstractEventLoop
    tokens_in: int = 0
    tokens_out: int = 0
    ttft: float | None = None  # seconds, the earliest of its engine requests
    tenant: str | None = None  # whose API key the request carried, once authenticated
    model: str | None = None  # the served model and version it was routed to, once routed
    version: str | None = None
    # how a call ended after its response began (a stream's error event, or 499 when its
    # client left): the status its metrics and access line take instead of the one sent
    ended_status: int | None = None
    error_code: str | None = None  # the API error code it was answered with, if any
    _outstanding: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _settled: asyncio.Event = field(default_factory=asyncio.Event)

    def expect_engine_requests(self, count: int) -> None:
        with self._lock:
            self._outstanding += count
            self._settled.clear()

    def engine_request_finished(self, tokens_in: int, tokens_out: int, ttft: float | None) -> None:
        """Called on the engine's output thread once per finished engine request."""
        with self._lock:
            self.tokens_in += tokens_in
            self.tokens_out += tokens_out
            if ttft is not None:
                self.ttft = ttft if self.ttft is None else min(self.ttft, ttft)
            self._outstanding -= 1
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits any more
            self.loop.call_soon_threadsafe(self._set_if_settled)

    def _set_if_settled(self) -> None:
        # re-checked on the loop: the handler may have submitted another request meanwhile
        with self._lock:
            if self._outstanding <= 0:
                self._settled.set()

    async def wait_engine(self, timeout: float) -> None:
        """Wait until every engine request has reported, for ``timeout`` seconds at most.

        The engine hands a request's final output to its handler just before the finish
        listener runs, so a fast handler can send its response first; waiting here keeps
        the access line complete. A tag that was never submitted only costs the timeout.
        """
        with self._lock:
            if self._outstanding <= 0:
                return
        with contextlib.suppress(asyncio.TimeoutError):  # not the builtin one before 3.11
            await asyncio.wait_for(self._settled.wait(), timeout)


def exchange_of(request: HttpRequest) -> Exchange | None:
    return request.scope.get("state", {}).get(TAG)


def expecting(exchange: Exchange | None, num_requests: int = 1) -> Exchange | None:
    """``exchange``, told that one call (HTTP or gRPC) submits ``num_requests`` engine
    requests: the ``caller`` to give each of them.

    Call it once per batch of submits, with the batch size. Without an exchange (no
    middleware) it returns None, which the engine accepts.
    """
    if exchange is not None:
        exchange.expect_engine_requests(num_requests)
    return exchange
