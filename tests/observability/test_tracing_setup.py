"""The tracer provider's exporters, and the phase spans of requests that ended early."""

from __future__ import annotations

import socket
import subprocess
import sys
import textwrap
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from opentelemetry import trace
from opentelemetry.context import get_current
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import StatusCode

from auto_glm.engine.request import Request
from auto_glm.observability.tracing import EXIT_FLUSH_S, record_engine_spans, setup_tracing
from auto_glm.sampling_params import SamplingParams


@pytest.fixture
def collector():
    """A stand-in OTLP/HTTP collector on 127.0.0.1: records (path, content type) of posts."""
    received: list[tuple[str, str]] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            self.rfile.read(int(self.headers["Content-Length"]))
            received.append((self.path, self.headers["Content-Type"]))
            self.send_response(200)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}", received
    server.shutdown()


def test_otlp_endpoint_receives_spans(collector):
    url, received = collector
    provider = setup_tracing("autoglm-test", url)
    provider.get_tracer("t").start_span("work").end()
    assert provider.force_flush(10_000)
    assert received == [("/v1/traces", "application/x-protobuf")]
    provider.shutdown()


def test_no_endpoint_exports_nothing_even_with_the_otel_env_set(collector, monkeypatch):
    url, received = collector
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", url)
    provider = setup_tracing("autoglm-test", None)
    with provider.get_tracer("t").start_as_current_span("work") as span:
        assert span.get_span_context().is_valid  # ids still reach logs and headers
    assert provider.force_flush(10_000)
    assert received == []
    provider.shutdown()


def _request(arrival: float) -> Request:
    return Request("r-1", [1, 2, 3], SamplingParams(), arrival_time=arrival)


def _spans(request: Request, error: BaseException | None = None) -> dict:
    exporter = InMemorySpanExporter()
    provider = setup_tracing("autoglm-test", span_exporter=exporter)
    tracer = provider.get_tracer("t")
    with tracer.start_as_current_span("server"):
        record_engine_spans(tracer, get_current(), request, None, error, 0)
    return {s.name: s for s in exporter.get_finished_spans()}


def test_a_request_aborted_while_queued_has_only_a_queued_phase():
    request = _request(100.0)
    request.metrics.finished_time = 100.5
    spans = _spans(request)
    assert set(spans) == {"server", "engine.request", "queued"}
    assert spans["queued"].end_time - spans["queued"].start_time == pytest.approx(5e8, abs=10)


def test_a_failed_request_has_an_error_status_and_its_phases():
    request = _request(100.0)
    request.metrics.first_scheduled_time = 100.1
    request.metrics.finished_time = 100.3
    spans = _spans(request, RuntimeError("engine error"))
    assert set(spans) == {"server", "engine.request", "queued", "prefill"}
    assert spans["engine.request"].status.status_code is StatusCode.ERROR
    assert spans["prefill"].end_time == spans["engine.request"].end_time
    assert trace.format_trace_id(spans["queued"].context.trace_id) == trace.format_trace_id(
        spans["server"].context.trace_id
    )


def test_a_collector_that_hangs_does_not_hold_the_exit(tmp_path):
    """A collector that accepts and never answers held the process's exit for 20 s and
    more (the exporter's timeout, twice), past a drain and Kubernetes' grace period."""
    hanging = socket.create_server(("127.0.0.1", 0))  # accepts into its backlog, never reads
    child = textwrap.dedent(
        f"""
        import time
        from auto_glm.observability.tracing import setup_tracing
        provider = setup_tracing("autoglm-test", "http://127.0.0.1:{hanging.getsockname()[1]}")
        provider.get_tracer("t").start_span("work").end()
        print(time.time(), flush=True)
        """
    )
    try:
        done = subprocess.run(
            [sys.executable, "-c", child], capture_output=True, text=True, timeout=60
        )
        exited = time.time()
    finally:
        hanging.close()
    assert done.returncode == 0, done.stderr
    assert exited - float(done.stdout) < EXIT_FLUSH_S + 2
    assert "the last spans are dropped" in done.stderr
