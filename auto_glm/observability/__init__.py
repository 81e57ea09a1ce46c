"""Metrics, structured logs and traces for the server, plugged in with one call.

``install_observability(app, engines=...)`` adds ``GET /metrics`` and the request
middleware (request ids, server spans, HTTP metrics, access log); ``Observability.watch``
adds an engine's finish listener (per-request metrics and phase spans) as it is loaded.
Handlers pass their call's exchange as the ``caller`` of ``EngineClient.submit``
(:func:`~auto_glm.observability.exchange.expecting`) so an engine request joins the call's
trace and log line.
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
from auto_glm.observability.collectors import Engines, EngineStatsCollector
from auto_glm.observability.gpu import nvml_collector
from auto_glm.observability.listener import finish_listener
from auto_glm.observability.logging import setup_logging
from auto_glm.observability.metrics import HttpMetricSet, RequestMetricSet
from auto_glm.observability.middleware import ObservabilityMiddleware
from auto_glm.observability.tracing import setup_tracing

__all__ = ["Observability", "install_observability", "setup_logging"]


@dataclass
class Observability:
    registry: CollectorRegistry
    tracer_provider: TracerProvider
    request_metrics: RequestMetricSet
    http_metrics: HttpMetricSet  # every API call, REST or gRPC (method "GRPC")

    def watch(self, engine: EngineClient, labels: dict[str, str]) -> None:
        """Observe every request ``engine`` finishes, under ``labels`` (model, version)."""
        self.request_metrics.touch(labels)
        self.http_metrics.touch(labels)
        tracer = self.tracer_provider.get_tracer("auto_glm.server")
        engine.add_finish_listener(finish_listener(self.request_metrics, tracer, labels))


def install_observability(
    app: FastAPI,
    *,
    engines: Engines,
    ready: Callable[[str], bool],
    log_level: str = "info",
    log_format: str = "json",
    otlp_endpoint: str | None = None,
    span_exporter: SpanExporter | None = None,
    service_name: str = "autoglm",
    redact: Callable[[str], str] = str,
) -> Observability:
    """Wire metrics, logs and traces into ``app``; call once, before the app serves.

    ``engines()`` lists the loaded engines with their labels (model, version) at scrape time;
    ``ready(model)`` says whether the server takes requests for a model (``autoglm:ready``).
    Call :meth:`Observability.watch` for each engine as it is loaded. ``span_exporter``
    receives every span as well as (or instead of) the OTLP endpoint, e.g. an in-memory
    exporter in tests. ``redact(path)`` is the request path as logs and traces keep it
    (without the secrets a client may have put there).
    """
    if app.middleware_stack is not None:
        raise RuntimeError("install_observability must run before the app serves its first request")
    setup_logging(log_level, log_format)
    # Process-wide switch: the *_created series (start time of every counter and histogram)
    # would double the series count and no dashboard or alert reads them.
    disable_created_metrics()
    registry = CollectorRegistry()
    registry.register(EngineStatsCollector(engines, ready))
    if (gpu := nvml_collector()) is not None:
        registry.register(gpu)
    provider = setup_tracing(service_name, otlp_endpoint, span_exporter)
    tracer = provider.get_tracer("auto_glm.server")

    async def metrics(_: HttpRequest) -> Response:
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    app.add_route("/metrics", metrics, methods=["GET"], include_in_schema=False)
    http_metrics = HttpMetricSet(registry)
    build_stack = app.build_middleware_stack

    def build_observed_stack():
        # Outside Starlette's ServerErrorMiddleware (add_middleware can only go inside it),
        # so an unhandled exception's 500 still gets its request id, metrics and log line.
        return ObservabilityMiddleware(
            build_stack(), tracer=tracer, http_metrics=http_metrics, redact=redact
        )

    app.build_middleware_stack = build_observed_stack
    observability = Observability(registry, provider, RequestMetricSet(registry), http_metrics)
    app.state.observability = observability
    return observability
