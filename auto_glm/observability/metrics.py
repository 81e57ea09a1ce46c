"""Prometheus metrics observed as requests finish: per-request latencies and tokens, HTTP traffic.

Everything lives in the app's own ``CollectorRegistry``, never the process-global one, so
several servers in one process do not collide. Names carry the ``autoglm:`` prefix; every
series has ``model`` and ``version`` labels (the served name and the version that served
it; empty on HTTP routes that use no model); engine and request series have a ``replica``
label (the Ray Serve replica that ran it; empty in a single-process server), and the
per-request ones a ``tenant`` label too (empty for calls without an API key; tenants are
names in the store, so its values are bounded).
"""

from __future__ import annotations

from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Histogram

from auto_glm.engine.outputs import RequestOutput
from auto_glm.engine.request import Request

__all__ = [
    "BASE_LABELS",
    "REQUEST_LABELS",
    "FinishedRequest",
    "HttpMetricSet",
    "RequestMetricSet",
]

BASE_LABELS = ("model", "version", "replica")
REQUEST_LABELS = (*BASE_LABELS, "tenant")

_LATENCY_BUCKETS = (
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    20.0,
    30.0,
    60.0,
    120.0,
    300.0,
    600.0,
)
_TTFT_BUCKETS = (
    0.001,
    0.005,
    0.01,
    0.02,
    0.04,
    0.06,
    0.08,
    0.1,
    0.25,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    7.5,
    10.0,
    20.0,
    40.0,
    80.0,
)
_ITL_BUCKETS = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.075,
    0.1,
    0.15,
    0.2,
    0.3,
    0.4,
    0.5,
    0.75,
    1.0,
    2.5,
)
_TOKEN_BUCKETS = (
    1,
    2,
    5,
    10,
    20,
    50,
    100,
    200,
    500,
    1_000,
    2_000,
    5_000,
    10_000,
    20_000,
    50_000,
    100_000,
    200_000,
)


@dataclass
class FinishedRequest:
    """The numbers of one finished engine request, in seconds and tokens."""

    tenant: str  # "" without an API key
    prompt_tokens: int
    generation_tokens: int  # as delivered to the caller (the API's usage), not as decoded
    finish_reason: str | None  # None when the request failed
    e2e: float
    queue: float | None
    prefill: float | None
    decode: float | None
    ttft: float | None
    itl: float | None  # mean gap between output tokens, when there were at least two

    @classmethod
    def of(cls, request: Request, output: RequestOutput | None) -> FinishedRequest:
        m = request.metrics
        end = m.finished_time
        # A stop string ends the request on the output thread while the loop may already have
        # decoded further tokens; the caller's usage counts the delivered ones.
        n_out = len(output.outputs.token_ids) if output is not None else request.num_output_tokens
        first, sched = m.first_token_time, m.first_scheduled_time
        return cls(
            tenant=request.tenant or "",
            prompt_tokens=request.num_prompt_tokens,
            generation_tokens=n_out,
            finish_reason=output.outputs.finish_reason if output is not None else None,
            e2e=end - m.arrival_time,
            queue=None if sched is None else sched - m.arrival_time,
            prefill=None if sched is None or first is None else first - sched,
            decode=None if first is None else end - first,
            ttft=None if first is None else first - m.arrival_time,
            itl=(end - first) / (n_out - 1) if first is not None and n_out > 1 else None,
        )


class RequestMetricSet:
    """Per-request metrics, observed once per engine request by the finish listener."""

    def __init__(self, registry: CollectorRegistry) -> None:
        def hist(name: str, doc: str, buckets: tuple) -> Histogram:
            return Histogram(
                f"autoglm:{name}", doc, REQUEST_LABELS, registry=registry, buckets=buckets
            )

        def counter(name: str, doc: str) -> Counter:
            return Counter(f"autoglm:{name}", doc, REQUEST_LABELS, registry=registry)

        self.success = Counter(
            "autoglm:request_success",
            "Requests the engine finished, by finish reason (stop, length, abort)",
            (*REQUEST_LABELS, "finish_reason"),
            registry=registry,
        )
        self.failure = counter("request_failure", "Requests the engine ended with an error")
        self.ttft = hist(
            "time_to_first_token_seconds", "Arrival to first output token", _TTFT_BUCKETS
        )
        self.itl = hist(
            "inter_token_latency_seconds",
            "Mean gap between output tokens, one observation per request with at least two tokens",
            _ITL_BUCKETS,
        )
        self.e2e = hist("e2e_request_latency_seconds", "Arrival to finish", _LATENCY_BUCKETS)
        self.queue = hist(
            "request_queue_time_seconds", "Arrival to first scheduling", _LATENCY_BUCKETS
        )
        self.prefill = hist(
            "request_prefill_time_seconds", "First scheduling to first token", _LATENCY_BUCKETS
        )
        self.decode = hist("request_decode_time_seconds", "First token to finish", _LATENCY_BUCKETS)
        self.prompt_hist = hist(
            "request_prompt_tokens", "Prompt tokens per request", _TOKEN_BUCKETS
        )
        self.generation_hist = hist(
            "request_generation_tokens", "Generated tokens per request", _TOKEN_BUCKETS
        )
        self.prompt_tokens = counter("prompt_tokens", "Prompt tokens of finished requests")
        self.generation_tokens = counter(
            "generation_tokens", "Generated tokens of finished requests"
        )

    def touch(self, labels: dict[str, str]) -> None:
        """Show a newly loaded version's series from the start, at 0, for calls without a key."""
        for metric in (
            self.failure,
            self.ttft,
            self.itl,
            self.e2e,
            self.queue,
            self.prefill,
            self.decode,
            self.prompt_hist,
            self.generation_hist,
            self.prompt_tokens,
            self.generation_tokens,
        ):
            metric.labels(**labels, tenant="")

    def observe(self, done: FinishedRequest, version_labels: dict[str, str]) -> None:
        labels = {**version_labels, "tenant": done.tenant}
        if done.finish_reason is None:
            self.failure.labels(**labels).inc()
            return
        self.success.labels(**labels, finish_reason=done.finish_reason).inc()
        self.e2e.labels(**labels).observe(done.e2e)
        for hist, value in (
            (self.ttft, done.ttft),
            (self.itl, done.itl),
            (self.queue, done.queue),
            (self.prefill, done.prefill),
            (self.decode, done.decode),
        ):
            if value is not None:
                hist.labels(**labels).observe(value)
        self.prompt_hist.labels(**labels).observe(done.prompt_tokens)
        self.generation_hist.labels(**labels).observe(done.generation_tokens)
        self.prompt_tokens.labels(**labels).inc(done.prompt_tokens)
        self.generation_tokens.labels(**labels).inc(done.generation_tokens)


class HttpMetricSet:
    """HTTP requests by route template (not raw path: bounded series) and status."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.requests = Counter(
            "autoglm:http_requests",
            "HTTP requests by method, route, status and tenant (empty without an API key)",
            ("model", "version", "method", "route", "status", "tenant"),
            registry=registry,
        )
        self.refused = Counter(
            "autoglm:requests_refused",
            "Calls refused with 429 or 503, by reason: the error code (queue_full, draining, "
            "a tenant limit such as rpm_exceeded, ...)",
            ("model", "version", "reason"),
            registry=registry,
        )
        self.latency = Histogram(
            "autoglm:http_request_duration_seconds",
            "HTTP request start to last byte of the response",
            ("model", "version", "method", "route"),
            registry=registry,
            buckets=_LATENCY_BUCKETS,
        )

    def touch(self, labels: dict[str, str]) -> None:
        """Export a served version's queue_full series at 0, which the saturation alert
        reads, before any call is refused."""
        self.refused.labels(model=labels["model"], version=labels["version"], reason="queue_full")

    def observe(
        self,
        method: str,
        route: str,
        status: int,
        seconds: float,
        tenant: str | None = None,
        model: str | None = None,
        version: str | None = None,
        code: str | None = None,
    ) -> None:
        served = {"model": model or "", "version": version or ""}
        self.requests.labels(
            **served, method=method, route=route, status=str(status), tenant=tenant or ""
        ).inc()
        if status in (429, 503) and code:  # codes are this server's own: a bounded set
            self.refused.labels(**served, reason=code).inc()
        self.latency.labels(**served, method=method, route=route).observe(seconds)
