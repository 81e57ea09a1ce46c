"""The engine's finish listener: metrics, phase spans and a log line for every finished request."""

from __future__ import annotations

import logging

from opentelemetry import trace
from opentelemetry.trace import Tracer

from auto_glm.engine.client import FinishListener
from auto_glm.engine.outputs import RequestOutput
from auto_glm.engine.request import Request
from auto_glm.observability.logging import format_trace_id
from auto_glm.observability.metrics import FinishedRequest, RequestMetricSet
from auto_glm.observability.tracing import record_engine_spans

__all__ = ["finish_listener"]

log = logging.getLogger("auto_glm.engine")


def finish_listener(
    metrics: RequestMetricSet, tracer: Tracer, labels: dict[str, str]
) -> FinishListener:
    """Runs on the engine's output thread, so it carries request and trace ids explicitly;
    ``labels`` name the model and version the engine serves."""

    def on_finish(
        request: Request, output: RequestOutput | None, error: BaseException | None
    ) -> None:
        done = FinishedRequest.of(request, output)
        served = labels if request.replica is None else {**labels, "replica": request.replica}
        metrics.observe(done, served)
        exchange = request.caller
        ids: dict[str, str | None] = {"request_id": None, "trace_id": None}
        if exchange is not None:
            record_engine_spans(
                tracer, exchange.otel_context, request, output, error, done.generation_tokens
            )
            exchange.engine_request_finished(done.prompt_tokens, done.generation_tokens, done.ttft)
            span_context = trace.get_current_span(exchange.otel_context).get_span_context()
            ids = {
                "request_id": exchange.request_id,
                "trace_id": format_trace_id(span_context.trace_id)
                if span_context.is_valid
                else None,
            }
        fields = {
            **ids,
            **served,
            "engine_request_id": request.request_id,
            "tenant": request.tenant,
            "finish_reason": done.finish_reason,
            "prompt_tokens": done.prompt_tokens,
            "generation_tokens": done.generation_tokens,
            "cached_tokens": request.num_cached_tokens,
            "e2e_s": round(done.e2e, 6),
            "ttft_s": None if done.ttft is None else round(done.ttft, 6),
        }
        if error is not None:
            log.warning("engine request failed: %s", error, extra=fields)
        else:
            log.debug("engine request finished", extra=fields)

    return on_finish
