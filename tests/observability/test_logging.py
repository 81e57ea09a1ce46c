"""The log line format: one JSON object per line with ids, or readable text."""

from __future__ import annotations

import io
import json
import logging

import pytest
from opentelemetry.sdk.trace import TracerProvider

from auto_glm.observability.logging import bind_request_id, reset_request_id, setup_logging


@pytest.fixture
def stream():
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield io.StringIO()
    root.handlers[:] = handlers
    root.setLevel(level)


def _lines(stream: io.StringIO) -> list[dict]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def test_json_line_carries_context_ids_and_extra_fields(stream):
    setup_logging("info", "json", stream)
    tracer = TracerProvider().get_tracer("test")
    token = bind_request_id("req-42")
    try:
        with tracer.start_as_current_span("work") as span:
            logging.getLogger("auto_glm.test").info(
                "hello %s\nworld", "there", extra={"tokens_in": 7, "odd": {1, 2}}
            )
    finally:
        reset_request_id(token)
    [entry] = _lines(stream)
    assert entry["event"] == "hello there\nworld"
    assert entry["level"] == "info" and entry["logger"] == "auto_glm.test"
    assert entry["request_id"] == "req-42"
    assert entry["trace_id"] == format(span.get_span_context().trace_id, "032x")
    assert entry["span_id"] == format(span.get_span_context().span_id, "016x")
    assert entry["tokens_in"] == 7 and entry["odd"] == "{1, 2}"
    assert entry["timestamp"].endswith("+00:00")


def test_explicit_ids_win_and_missing_ids_are_null(stream):
    setup_logging("debug", "json", stream)
    log = logging.getLogger("auto_glm.test")
    log.debug("from another thread", extra={"request_id": "r1", "trace_id": "ab" * 16})
    log.info("no context")
    first, second = _lines(stream)
    assert (first["request_id"], first["trace_id"]) == ("r1", "ab" * 16)
    assert second["request_id"] is None and second["trace_id"] is None


def test_exception_is_kept_inside_the_one_line(stream):
    setup_logging("info", "json", stream)
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        logging.getLogger("auto_glm.test").exception("failed")
    [entry] = _lines(stream)
    assert "RuntimeError: boom" in entry["exception"]


def test_level_filters_and_setup_replaces_its_handler(stream):
    setup_logging("warning", "json", io.StringIO())
    setup_logging("warning", "json", stream)
    named = [h for h in logging.getLogger().handlers if h.get_name() == "autoglm"]
    assert len(named) == 1
    logging.getLogger("auto_glm.test").info("dropped")
    logging.getLogger("auto_glm.test").warning("kept")
    assert [e["event"] for e in _lines(stream)] == ["kept"]


def test_text_format(stream):
    setup_logging("info", "text", stream)
    token = bind_request_id("req-7")
    try:
        logging.getLogger("auto_glm.access").info("request", extra={"status": 200})
    finally:
        reset_request_id(token)
    line = stream.getvalue().strip()
    assert " INFO auto_glm.access [req-7 -] request status=200" in line


def test_a_clients_line_breaks_cannot_forge_a_text_record(stream):
    setup_logging("info", "text", stream)
    forged = "x\n2026-12-02T00:00:00.000+00:00 CRITICAL auto_glm.serving [forged -] engine died"
    log = logging.getLogger("auto_glm.access")
    log.info("request", extra={"path": f"/v1/models/{forged}"})
    log.info("user %s\u2028said\r\nhi", "x")
    lines = stream.getvalue().splitlines()
    assert len(lines) == 2 and "CRITICAL" not in lines[0].split(" path=")[0]
    assert lines[0].endswith(
        "path=/v1/models/x\\n2026-12-02T00:00:00.000+00:00 CRITICAL "
        "auto_glm.serving [forged -] engine died"
    )
    assert lines[1].endswith("user x\\u2028said\\r\\nhi")


@pytest.mark.parametrize(("level", "fmt"), [("loud", "json"), ("info", "xml")])
def test_bad_settings_are_refused(level, fmt):
    with pytest.raises(ValueError, match="invalid"):
        setup_logging(level, fmt)
