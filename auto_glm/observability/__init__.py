"""Metrics, structured logs and traces for the server, plugged in with one call.

``install_observability(app, engine, model_name=...)`` adds ``GET /metrics``, the request
middleware (request ids, server spans, HTTP metrics, access log) and the engine's finish
listener (per-request metrics and phase spans). Handlers pass ``tags=request_tags(request)``
to ``EngineClient.submit`` so an engine request joins its HTTP request's trace and log line.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from fastapi import FastAPI
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SpanExporter
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    disable_created_metrics,
    generate_latest,
)
from starlette.requests import Request as HttpRequest
from starlette.responses import Response

from auto_glm.engine.client import EngineClient
from auto_glm.observability.collectors import EngineStatsCollector
from auto_glm.observability.exchange import request_tags
from auto_glm.observability.gpu import nvml_collector
from auto_glm.observability.listener import finish_listener
from auto_glm.observability.logging import setup_logging
from auto_glm.observability.metrics import HttpMetricSet, RequestMetricSet
from auto_glm.observability.middleware import ObservabilityMiddleware
from auto_glm.observability.tracing import setup_tracing

__all__ = ["Observability", "install_observability", "request_tags", "setup_logging"]


@dataclass
class Observability:
    registry: CollectorRegistry
    tracer_provider: TracerProvider


def install_observability(
    app: FastAPI,
    engine: EngineClient,
    *,
    model_name: str,
    log_level: str = "info",
    log_format: str = "json",
    otlp_endpoint: str | None = None,
    span_exporter: SpanExporter | None = None,
    ready: Callable[[], bool] | None = None,
    service_name: str = "autoglm",
) -> Observability:
    """Wire metrics, logs and traces into ``app``; call once, before the app serves.

    ``ready`` says whether the server takes requests (``autoglm:ready``); by default it is
    whether the engine is alive. ``span_exporter`` receives every span as well as (or
    instead of) the OTLP endpoint, e.g. an in-memory exporter in tests.
    """
    if app.middleware_stack is not None:
        raise RuntimeError("install_observability must run before the app serves its first request")
    setup_logging(log_level, log_format)
    # Process-wide switch: the *_created series (start time of every counter and histogram)
    # would double the series count and no dashboard or alert reads them.
    disable_created_metrics()
    labels = {"model": model_name}
    registry = CollectorRegistry()
    registry.register(EngineStatsCollector(engine, labels, ready or (lambda: engine.is_alive)))
    if (gpu := nvml_collector(labels)) is not None:
        registry.register(gpu)
    provider = setup_tracing(service_name, otlp_endpoint, span_exporter)
    tracer = provider.get_tracer("auto_glm.server")
    engine.add_finish_listener(finish_listener(RequestMetricSet(registry, labels), tracer))

    async def metrics(_: HttpRequest) -> Response:
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    app.add_route("/metrics", metrics, methods=["GET"], include_in_schema=False)
    http_metrics = HttpMetricSet(registry, labels)
    build_stack = app.build_middleware_stack

    def build_observed_stack():
        # Outside Starlette's ServerErrorMiddleware (add_middleware can only go inside it),
        # so an unhandled exception's 500 still gets its request id, metrics and log line.
        return ObservabilityMiddleware(build_stack(), tracer=tracer, http_metrics=http_metrics)

    app.build_middleware_stack = build_observed_stack
    observability = Observability(registry, provider)
    app.state.observability = observability
    return observability
