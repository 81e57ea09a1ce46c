"""The gRPC side of the request middleware: each call gets a request id, a server span (its
parent read from the ``traceparent`` metadata), the HTTP metrics with ``method="GRPC"`` and
``route`` the full method name, and an access log line, exactly as a REST call does; the
handler answers the id (and ``traceparent``) as REST does in headers.

``status`` in metrics and logs is the HTTP status the same outcome has on REST (200, 400,
429, 499 for a caller that cancelled, 504 for a passed deadline...), so dashboards and
alerts cover both transports.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass

from opentelemetry import context as otel_context
from opentelemetry.trace import SpanKind, Status, StatusCode

from auto_glm.observability import Observability
from auto_glm.observability.exchange import Exchange
from auto_glm.observability.logging import bind_request_id, reset_request_id
from auto_glm.observability.middleware import CLIENT_ID, record_call
from auto_glm.observability.tracing import extract_context, traceparent_of

__all__ = ["ObservedCall", "observe_call"]

log = logging.getLogger("auto_glm.observability")


@dataclass
class ObservedCall:
    exchange: Exchange
    # what REST answers in headers: x-request-id and, when traced, traceparent; sent as the
    # call's initial metadata (or with an error's trailers)
    ids: tuple[tuple[str, str], ...] = ()
    status: int = 200  # set by the handler when the call fails


@asynccontextmanager
async def observe_call(
    observability: Observability, method: str, metadata: Mapping[str, str]
) -> AsyncIterator[ObservedCall]:
    """Observe one gRPC call to ``method`` (``/autoglm.v1.Inference/Generate``)."""
    start = time.perf_counter()
    client_id = metadata.get("x-request-id", "")
    request_id = client_id if CLIENT_ID.fullmatch(client_id) else uuid.uuid4().hex
    tracer = observability.tracer_provider.get_tracer("auto_glm.server")
    with tracer.start_as_current_span(
        f"GRPC {method}",
        context=extract_context(metadata),
        kind=SpanKind.SERVER,
        record_exception=False,
        set_status_on_exception=False,
        attributes={"rpc.system": "grpc", "rpc.method": method, "autoglm.request_id": request_id},
    ) as span:
        token = bind_request_id(request_id)
        exchange = Exchange(request_id, otel_context.get_current(), asyncio.get_running_loop())
        ids = [("x-request-id", request_id)]
        if (traceparent := traceparent_of(span)) is not None:
            ids.append(("traceparent", traceparent))
        call = ObservedCall(exchange, tuple(ids))
        try:
            yield call
        except asyncio.CancelledError:  # the caller went away, or its deadline passed
            if call.status == 200:
                call.status = 499
            raise
        except Exception as exc:
            if call.status == 200:
                call.status = 500
                span.record_exception(exc)
                log.error("unhandled error while serving %s", method, extra={"error": repr(exc)})
            raise
        finally:
            elapsed = time.perf_counter() - start
            await record_call(
                observability.http_metrics, exchange, "GRPC", method, method, call.status, elapsed
            )
            span.set_attribute("autoglm.status", call.status)
            span.set_attribute("gen_ai.usage.input_tokens", exchange.tokens_in)
            span.set_attribute("gen_ai.usage.output_tokens", exchange.tokens_out)
            if call.status >= 500:
                span.set_status(Status(StatusCode.ERROR))
            reset_request_id(token)
