"""Traces and request ids: one request's span tree, its propagated trace id, its log lines."""

from __future__ import annotations

import io
import json
import time

import pytest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from auto_glm.observability import setup_logging
from tests.observability.conftest import MODEL, sample

pytestmark = pytest.mark.integration

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_ID = "00f067aa0ba902b7"


def _wait_for_span(exporter: InMemorySpanExporter, name: str, timeout: float = 10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        spans = exporter.get_finished_spans()
        if any(s.name == name for s in spans):
            return list(spans)
        time.sleep(0.02)
    raise AssertionError(f"no span {name!r} among {[s.name for s in spans]}")


def test_one_request_span_tree_trace_id_and_log_lines(start_server):
    exporter = InMemorySpanExporter()
    server = start_server(span_exporter=exporter, log_level="debug")
    logs = io.StringIO()
    setup_logging("debug", "json", logs)
    with server.client() as client:
        response = client.post(
            "/v1/completions",
            json={"model": MODEL, "prompt": "trace me", "max_tokens": 5, "ignore_eos": True},
            headers={
                "traceparent": f"00-{TRACE_ID}-{PARENT_ID}-01",
                "X-Request-ID": "client-req-1",
            },
        )
    assert response.status_code == 200
    usage = response.json()["usage"]
    assert response.headers["x-request-id"] == "client-req-1"
    assert response.headers["traceparent"].split("-")[1] == TRACE_ID

    spans = _wait_for_span(exporter, "POST /v1/completions")
    by_name = {s.name: s for s in spans}
    server_span = by_name["POST /v1/completions"]
    engine_span, queued, prefill, decode = (
        by_name[n] for n in ("engine.request", "queued", "prefill", "decode")
    )
    assert {format(s.context.trace_id, "032x") for s in spans} == {TRACE_ID}
    assert server_span.kind is SpanKind.SERVER
    assert format(server_span.parent.span_id, "016x") == PARENT_ID and server_span.parent.is_remote
    assert engine_span.parent.span_id == server_span.context.span_id
    for phase in (queued, prefill, decode):
        assert phase.parent.span_id == engine_span.context.span_id
    # the phases tile the engine request, which lies inside the HTTP request
    assert engine_span.start_time == queued.start_time
    assert queued.end_time == prefill.start_time and prefill.end_time == decode.start_time
    assert decode.end_time == engine_span.end_time
    assert server_span.start_time <= engine_span.start_time
    assert engine_span.end_time <= server_span.end_time
    assert server_span.attributes["http.route"] == "/v1/completions"
    assert server_span.attributes["http.response.status_code"] == 200
    assert server_span.attributes["autoglm.request_id"] == "client-req-1"
    assert engine_span.attributes["gen_ai.usage.output_tokens"] == usage["completion_tokens"]

    lines = [json.loads(line) for line in logs.getvalue().splitlines()]
    mine = [e for e in lines if e["request_id"] == "client-req-1"]
    assert {e["trace_id"] for e in mine} == {TRACE_ID}
    [access] = [e for e in mine if e["logger"] == "auto_glm.access"]
    assert (access["status"], access["route"]) == (200, "/v1/completions")
    assert access["tokens_in"] == usage["prompt_tokens"]
    assert access["tokens_out"] == usage["completion_tokens"]
    assert 0 < access["ttft_s"] <= access["latency_s"]
    [finished] = [e for e in mine if e["event"] == "engine request finished"]
    assert finished["finish_reason"] == "length"


def test_a_request_without_ids_gets_new_ones(start_server):
    exporter = InMemorySpanExporter()
    server = start_server(span_exporter=exporter)
    with server.client() as client:
        first = client.get("/v1/models", headers={"X-Request-ID": "bad id\twith spaces"})
        second = client.get("/v1/models")
    ids = {first.headers["x-request-id"], second.headers["x-request-id"]}
    assert len(ids) == 2 and all(len(i) == 32 for i in ids)
    spans = _wait_for_span(exporter, "GET /v1/models")
    trace_ids = {s.context.trace_id for s in spans}
    assert len(trace_ids) == 2 and all(s.parent is None for s in spans)


def test_an_unhandled_error_is_a_500_with_ids_metrics_and_a_logged_trace(start_server):
    exporter = InMemorySpanExporter()
    server = start_server(span_exporter=exporter)

    async def broken() -> None:
        raise RuntimeError("handler bug")

    server.app.add_api_route("/broken", broken)
    logs = io.StringIO()
    setup_logging("info", "json", logs)
    with server.client() as client:
        response = client.get("/broken", headers={"X-Request-ID": "crash-1"})
    assert response.status_code == 500
    assert response.headers["x-request-id"] == "crash-1"
    [span] = _wait_for_span(exporter, "GET /broken")
    assert span.status.status_code is StatusCode.ERROR
    assert span.events[0].name == "exception"
    lines = [json.loads(line) for line in logs.getvalue().splitlines()]
    errors = [e for e in lines if e["level"] == "error" and e["request_id"] == "crash-1"]
    assert {e["trace_id"] for e in errors} == {format(span.context.trace_id, "032x")}
    assert any("handler bug" in e.get("error", "") for e in errors)
    assert (
        sample(
            server.metrics(),
            "autoglm:http_requests_total",
            method="GET",
            route="/broken",
            status="500",
            model="",
        )
        == 1
    )


def test_probes_and_scrapes_are_not_traced(start_server):
    exporter = InMemorySpanExporter()
    server = start_server(span_exporter=exporter)
    with server.client() as client:
        assert client.get("/health").headers["x-request-id"]
        client.get("/metrics")
        client.get("/v1/models")
    assert [s.name for s in _wait_for_span(exporter, "GET /v1/models")] == ["GET /v1/models"]


def test_engine_spans_follow_a_wall_clock_stepped_after_start(monkeypatch):
    """Engine spans are written from monotonic times. They were converted by the wall clock's
    offset read at import, so a clock stepped later (NTP) moved them away from the server's
    span, which reads the wall clock: in one CI run the engine span began 0.8 s before it."""
    from opentelemetry.context import Context
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor

    from auto_glm.engine.request import Request
    from auto_glm.observability.tracing import record_engine_spans
    from auto_glm.sampling_params import SamplingParams

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    request = Request("r", [1, 2, 3], SamplingParams(max_tokens=2))
    request.metrics.arrival_time = time.monotonic() - 0.5
    real = time.time_ns
    monkeypatch.setattr(time, "time_ns", lambda: real() + 10**10)  # stepped 10 s ahead
    record_engine_spans(provider.get_tracer("t"), Context(), request, None, None, 0)
    (span,) = [s for s in exporter.get_finished_spans() if s.name == "engine.request"]
    assert abs(span.start_time - (time.time_ns() - 500_000_000)) < 200_000_000


def test_a_key_in_a_path_is_cut_from_logs_and_traces(start_server, tmp_path):
    """An administrator revokes a key by pasting it whole, with a stray space: the key is
    revoked, and neither the reply, the access log nor the span keeps its secret (they kept
    the whole path, and a damaged key was echoed back unrevoked)."""
    exporter = InMemorySpanExporter()
    config = {
        "admin_key": "admin-key-for-tests-0123456789",
        "database_url": f"sqlite:///{tmp_path / 't.db'}",
    }
    server = start_server(span_exporter=exporter, config=config)
    logs = io.StringIO()
    setup_logging("info", "json", logs)
    headers = {"Authorization": f"Bearer {config['admin_key']}"}
    with server.client() as client:
        assert client.post("/admin/tenants", json={"name": "acme"}, headers=headers).is_success
        made = client.post("/admin/tenants/acme/keys", json={}, headers=headers).json()
        key, key_id = made["key"], made["info"]["key_id"]
        secret = key.removeprefix(f"agk_{key_id}_")
        revoked = client.delete(f"/admin/keys/{key} ", headers=headers)
        damaged = client.delete(f"/admin/keys/agk_x_{secret}", headers=headers)
    assert revoked.status_code == 200 and revoked.json()["revoked_at"] is not None
    assert damaged.status_code == 404 and secret not in damaged.text
    assert "not shown: they may hold a secret" in damaged.json()["error"]["message"]
    spans = _wait_for_span(exporter, "DELETE /admin/keys/{key_id}")
    paths = [s.attributes["url.path"] for s in spans if s.name.startswith("DELETE")]
    # (the test's own client, httpx, logs its URLs too: not the server's)
    lines = [e for e in map(json.loads, logs.getvalue().splitlines()) if e["logger"] != "httpx"]
    logged = [e["path"] for e in lines if e["logger"] == "auto_glm.access"]
    assert f"/admin/keys/agk_{key_id}_..." in paths and f"/admin/keys/agk_{key_id}_..." in logged
    assert secret not in json.dumps(paths) + json.dumps(lines)
