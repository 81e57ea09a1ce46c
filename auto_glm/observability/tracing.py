"""OpenTelemetry tracing: a provider per app, W3C trace context in, phase spans per engine request.

The provider is never installed as the global one: several servers in one process (tests)
keep their spans apart, and FastAPI's built-in telemetry, which only switches on when a
global provider is configured, stays off instead of doubling every span.
"""

from __future__ import annotations

import atexit
import logging
import threading
import time
from collections.abc import Callable, Mapping
from urllib.parse import urlsplit

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor, SpanExporter
from opentelemetry.trace import SpanKind, Status, StatusCode, Tracer
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from auto_glm.engine.outputs import RequestOutput
from auto_glm.engine.request import Request

__all__ = ["extract_context", "record_engine_spans", "setup_tracing", "traceparent_of"]

_PROPAGATOR = TraceContextTextMapPropagator()
EXPORT_TIMEOUT_S = 5.0  # one export to the collector
EXIT_FLUSH_S = 3.0  # the most the last spans may hold up the process's exit
log = logging.getLogger("auto_glm.observability")


def setup_tracing(
    service_name: str, otlp_endpoint: str | None = None, span_exporter: SpanExporter | None = None
) -> TracerProvider:
    """A provider that exports to ``otlp_endpoint`` (OTLP over HTTP) and/or ``span_exporter``.

    With neither, spans are still created, so trace ids reach logs and propagate, but they
    are dropped instead of exported. An endpoint without a path gets ``/v1/traces``.
    """
    resource = Resource.create({"service.name": service_name})
    provider = TracerProvider(resource=resource, shutdown_on_exit=False)
    if otlp_endpoint:
        url = otlp_endpoint.rstrip("/")
        if urlsplit(url).path in ("", "/"):
            url += "/v1/traces"
        exporter = OTLPSpanExporter(endpoint=url, timeout=EXPORT_TIMEOUT_S)
        provider.add_span_processor(BatchSpanProcessor(exporter))
        atexit.register(_flush_at_exit, provider)
    if span_exporter is not None:
        # synchronous: a test reads its spans as soon as the request is done
        provider.add_span_processor(SimpleSpanProcessor(span_exporter))
    return provider


def _flush_at_exit(provider: TracerProvider) -> None:
    """Export the last spans as the process exits, for :data:`EXIT_FLUSH_S` at most: a
    collector that hangs drops them instead of holding the exit (past a drain, where
    Kubernetes' grace period may end)."""
    flushing = threading.Thread(target=provider.shutdown, name="autoglm-span-flush", daemon=True)
    flushing.start()
    flushing.join(EXIT_FLUSH_S)
    if flushing.is_alive():
        log.warning(
            "the trace collector took no spans for %g s at exit; the last spans are dropped",
            EXIT_FLUSH_S,
        )


def extract_context(headers: Mapping[str, str]) -> Context:
    """The parent context of an incoming ``traceparent`` header (empty when absent or invalid)."""
    return _PROPAGATOR.extract(headers)


def traceparent_of(span: trace.Span) -> str | None:
    carrier: dict[str, str] = {}
    _PROPAGATOR.inject(carrier, trace.set_span_in_context(span))
    return carrier.get("traceparent")


def _epoch_clock() -> Callable[[float], int]:
    """Monotonic seconds -> epoch ns, by the wall clock's offset read now: one offset for all
    of a request's spans (equal timestamps stay equal), and a wall clock stepped since the
    process started (NTP) does not set them apart from the server's span, which reads it."""
    offset = time.time_ns() - time.monotonic_ns()
    return lambda monotonic_s: int(monotonic_s * 1e9) + offset


def record_engine_spans(
    tracer: Tracer,
    parent: Context,
    request: Request,
    output: RequestOutput | None,
    error: BaseException | None,
    num_output_tokens: int,
) -> None:
    """Write the finished ``request`` as a span with children ``queued``, ``prefill``, ``decode``.

    Runs after the fact on the engine's output thread, so every span gets explicit start and
    end times from the request's monotonic timestamps. A phase the request never reached
    (aborted while queued, failed) is left out.
    """
    m = request.metrics
    epoch_ns = _epoch_clock()
    end = m.finished_time if m.finished_time is not None else time.monotonic()
    attributes = {
        "autoglm.engine_request_id": request.request_id,
        "gen_ai.usage.input_tokens": request.num_prompt_tokens,
        "gen_ai.usage.output_tokens": num_output_tokens,
        "autoglm.cached_tokens": request.num_cached_tokens,
        "autoglm.preemptions": m.num_preemptions,
    }
    if output is not None and output.outputs.finish_reason:
        attributes["gen_ai.response.finish_reasons"] = [output.outputs.finish_reason]
    span = tracer.start_span(
        "engine.request",
        context=parent,
        kind=SpanKind.INTERNAL,
        start_time=epoch_ns(m.arrival_time),
        attributes=attributes,
    )
    if error is not None:
        span.record_exception(error)
        span.set_status(Status(StatusCode.ERROR, str(error)))
    ctx = trace.set_span_in_context(span, parent)
    phases = [("queued", m.arrival_time, m.first_scheduled_time or end)]
    if m.first_scheduled_time is not None:
        phases.append(("prefill", m.first_scheduled_time, m.first_token_time or end))
    if m.first_token_time is not None:
        phases.append(("decode", m.first_token_time, end))
    for name, start, stop in phases:
        phase = tracer.start_span(name, context=ctx, start_time=epoch_ns(start))
        phase.end(end_time=epoch_ns(stop))
    span.end(end_time=epoch_ns(end))
