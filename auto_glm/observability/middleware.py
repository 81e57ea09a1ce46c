"""ASGI middleware: request id, server span, HTTP metrics and the access log line of each request.

It wraps the whole app, outside Starlette's error middleware, so even a 500 from an
unhandled exception carries ``X-Request-ID`` and is counted, traced and logged with its ids.
Pure ASGI rather than ``BaseHTTPMiddleware``: streamed responses pass through untouched and
the handler runs in this coroutine's context, so it sees the request id and current span.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
import uuid
from collections.abc import Callable
from contextlib import nullcontext

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import INVALID_SPAN, SpanKind, Status, StatusCode, Tracer
from starlette.datastructures import Headers, MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from auto_glm.observability.exchange import TAG, Exchange
from auto_glm.observability.logging import bind_request_id, reset_request_id
from auto_glm.observability.metrics import HttpMetricSet
from auto_glm.observability.tracing import extract_context, traceparent_of

__all__ = ["CLIENT_ID", "ObservabilityMiddleware", "record_call"]

access_log = logging.getLogger("auto_glm.access")
log = logging.getLogger("auto_glm.observability")

# A client's id is echoed into headers and logs: keep it short and free of odd characters.
CLIENT_ID = re.compile(r"[A-Za-z0-9._:\-]{1,128}")
# Probes and scrapes: counted, but logged at debug and not traced, or they would drown the rest.
QUIET_ROUTES = frozenset({"/metrics", "/health", "/ready"})
# How long the access line waits for the engine's finish listener (see Exchange.wait_engine).
ENGINE_REPORT_TIMEOUT = 2.0


class ObservabilityMiddleware:
    def __init__(
        self,
        app: ASGIApp,
        *,
        tracer: Tracer,
        http_metrics: HttpMetricSet,
        redact: Callable[[str], str] = str,
    ) -> None:
        self.app = app
        self.tracer = tracer
        self.http_metrics = http_metrics
        self.redact = redact

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        headers = Headers(scope=scope)
        client_id = headers.get("x-request-id", "")
        request_id = client_id if CLIENT_ID.fullmatch(client_id) else uuid.uuid4().hex
        method, path = scope["method"], self.redact(scope["path"])
        quiet = path in QUIET_ROUTES
        span_cm = (
            nullcontext(INVALID_SPAN)
            if quiet
            else self.tracer.start_as_current_span(
                method,
                context=extract_context(headers),
                kind=SpanKind.SERVER,
                record_exception=False,
                set_status_on_exception=False,
                attributes={
                    "http.request.method": method,
                    "url.path": path,
                    "autoglm.request_id": request_id,
                },
            )
        )
        status = 500  # what the client gets if the app raises before answering
        started = False

        with span_cm as span:

            async def send_with_ids(message: Message) -> None:
                nonlocal status, started
                if message["type"] == "http.response.start":
                    status, started = message["status"], True
                    out = MutableHeaders(scope=message)
                    out["x-request-id"] = request_id
                    if (traceparent := traceparent_of(span)) is not None:
                        out["traceparent"] = traceparent
                await send(message)

            token = bind_request_id(request_id)
            exchange = Exchange(request_id, otel_context.get_current(), asyncio.get_running_loop())
            scope.setdefault("state", {})[TAG] = exchange
            try:
                await self.app(scope, receive, send_with_ids)
            except Exception as exc:
                span.record_exception(exc)  # the traceback goes to the trace
                # One line, no traceback: the app's own 500 handler usually logged it already,
                # and this line carries the ids to find it.
                log.error(
                    "unhandled error while serving %s %s", method, path, extra={"error": repr(exc)}
                )
                if not started:  # nothing reached the client: let the server answer it
                    raise
            finally:
                elapsed = time.perf_counter() - start
                status = exchange.ended_status or status
                route = _route_template(scope)
                await record_call(
                    self.http_metrics, exchange, method, path, route, status, elapsed, quiet
                )
                _finish_span(span, method, route, status, exchange)
                reset_request_id(token)


async def record_call(
    http_metrics: HttpMetricSet,
    exchange: Exchange,
    method: str,
    path: str,
    route: str,
    status: int,
    elapsed: float,
    quiet: bool = False,
) -> None:
    """Count one finished call (REST, or gRPC with method "GRPC") and write its access line,
    once its engine requests have reported their tokens."""
    http_metrics.observe(
        method,
        route,
        status,
        elapsed,
        exchange.tenant,
        exchange.model,
        exchange.version,
        exchange.error_code,
    )
    # also for a call cut short (499, 504): its line counts what the engine generated,
    # as the token metrics do
    await exchange.wait_engine(ENGINE_REPORT_TIMEOUT)
    access_log.log(
        logging.DEBUG if quiet else logging.INFO,
        "request",
        extra={
            "method": method,
            "path": path,
            "route": route,
            "status": status,
            "tenant": exchange.tenant,
            "model": exchange.model,
            "version": exchange.version,
            "tokens_in": exchange.tokens_in,
            "tokens_out": exchange.tokens_out,
            "ttft_s": None if exchange.ttft is None else round(exchange.ttft, 6),
            "latency_s": round(elapsed, 6),
        },
    )


_UNMATCHED = "unmatched"


def _route_template(scope: Scope) -> str:
    """``/v1/models/{model}`` rather than the raw path (bounded label values); "unmatched"
    for paths no route serves.

    FastAPI's router records the matched route in the scope only for its own (API) routes.
    Starlette routes and mounts added beside them (``/metrics``, ``/openapi.json``, static
    files) leave just their endpoint there, so the route is found by its endpoint.
    """
    route = scope.get("route")
    if route is None and (endpoint := scope.get("endpoint")) is not None:
        router = scope.get("router")
        route = next(
            (
                candidate
                for candidate in getattr(router, "routes", ())
                if endpoint
                in (getattr(candidate, "endpoint", None), getattr(candidate, "app", None))
            ),
            None,
        )
    return getattr(route, "path", None) or _UNMATCHED


def _finish_span(
    span: trace.Span, method: str, route: str, status: int, exchange: Exchange
) -> None:
    # named once routing has run: "POST /v1/completions", or just the method for a stray path
    span.update_name(method if route == _UNMATCHED else f"{method} {route}")
    span.set_attribute("http.route", route)
    span.set_attribute("http.response.status_code", status)
    span.set_attribute("gen_ai.usage.input_tokens", exchange.tokens_in)
    span.set_attribute("gen_ai.usage.output_tokens", exchange.tokens_out)
    if status >= 500:
        span.set_status(Status(StatusCode.ERROR))
