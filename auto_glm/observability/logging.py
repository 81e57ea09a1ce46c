"""Structured logs: one JSON object per line (or readable text), stamped with request and trace ids.

Every record gets ``request_id`` and ``trace_id``: from the record's ``extra`` when the caller
gives them (the engine's output thread has no request context), otherwise from the context
of the HTTP request being served (a context variable set by the middleware and the current
OpenTelemetry span).
"""

from __future__ import annotations

import json
import logging
import sys
from contextvars import ContextVar, Token
from datetime import datetime, timezone
from typing import IO, Any

from opentelemetry import trace

__all__ = [
    "JsonFormatter",
    "TextFormatter",
    "bind_request_id",
    "current_request_id",
    "format_trace_id",
    "installed_logging",
    "reset_request_id",
    "setup_logging",
]

_request_id: ContextVar[str | None] = ContextVar("autoglm_request_id", default=None)

# Attributes every LogRecord has; anything else on a record came from ``extra=``. uvicorn adds
# "color_message", the message again with terminal colour codes: noise in a log line.
_STANDARD_ATTRS = frozenset(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {
    "message",
    "asctime",
    "taskName",
    "request_id",
    "trace_id",
    "span_id",
    "color_message",
}
# "trace" is uvicorn's level below debug (it logs ASGI messages there)
_LEVELS = {
    "trace": 5,
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
    "critical": logging.CRITICAL,
}
# uvicorn's own loggers get handlers of their own from its default log config; routing them
# through the root handler keeps every line in one format. Its access log is replaced by ours.
_UVICORN_LOGGERS = ("uvicorn", "uvicorn.error")


def bind_request_id(request_id: str) -> Token:
    return _request_id.set(request_id)


def reset_request_id(token: Token) -> None:
    _request_id.reset(token)


def current_request_id() -> str | None:
    return _request_id.get()


def format_trace_id(trace_id: int) -> str:
    return format(trace_id, "032x")


class _ContextFilter(logging.Filter):
    """Stamps request and trace ids on records that do not carry their own."""

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "request_id", None) is None:
            record.request_id = current_request_id()
        if getattr(record, "trace_id", None) is None:
            ctx = trace.get_current_span().get_span_context()
            record.trace_id = format_trace_id(ctx.trace_id) if ctx.is_valid else None
            record.span_id = format(ctx.span_id, "016x") if ctx.is_valid else None
        return True


def _extras(record: logging.LogRecord) -> dict[str, Any]:
    # private attributes are other libraries' bookkeeping (Ray's record factory adds
    # _ray_timestamp_ns to every record once it is imported), not fields of the event
    return {
        k: v
        for k, v in record.__dict__.items()
        if k not in _STANDARD_ATTRS and not k.startswith("_")
    }


def _timestamp(record: logging.LogRecord) -> str:
    return datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec="milliseconds")


class JsonFormatter(logging.Formatter):
    """One JSON object per record; values that are not JSON types are written with ``str``."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "timestamp": _timestamp(record),
            "level": record.levelname.lower(),
            "logger": record.name,
            "event": record.getMessage(),
            "request_id": getattr(record, "request_id", None),
            "trace_id": getattr(record, "trace_id", None),
        }
        if getattr(record, "span_id", None):
            entry["span_id"] = record.span_id
        entry.update(_extras(record))
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        # json.dumps escapes newlines inside values, so a record never spans two lines
        return json.dumps(entry, default=str)


# every character that splits a line for some reader (str.splitlines' set), escaped
_LINE_BREAKS = str.maketrans({c: repr(c)[1:-1] for c in "\n\r\v\f\x1c\x1d\x1e\x85\u2028\u2029"})


class TextFormatter(logging.Formatter):
    """``timestamp LEVEL logger [request_id trace_id] event key=value ...`` for humans.
    A record is one line (but for a traceback): line breaks in the event and the values,
    which may hold a client's text (a path, a user field), are escaped, so no client can
    write a line of its own into the log."""

    def format(self, record: logging.LogRecord) -> str:
        request_id = getattr(record, "request_id", None) or "-"
        ids = f"[{request_id} {getattr(record, 'trace_id', None) or '-'}]"
        fields = " ".join(f"{k}={v}" for k, v in _extras(record).items()).translate(_LINE_BREAKS)
        event = record.getMessage().translate(_LINE_BREAKS)
        line = f"{_timestamp(record)} {record.levelname} {record.name} {ids} {event}"
        line = f"{line} {fields}" if fields else line
        if record.exc_info:
            line = f"{line}\n{self.formatException(record.exc_info)}"
        return line


_installed: list[tuple[str, str]] = []  # what setup_logging installed last


def installed_logging() -> tuple[str, str] | None:
    """The (level, format) that :func:`setup_logging` installed last in this process (None:
    never), for a child process that logs as this one does."""
    return _installed[0] if _installed else None


def setup_logging(
    level: str = "info", fmt: str = "json", stream: IO[str] | None = None
) -> logging.Handler:
    """Send every log record to ``stream`` (stdout) in ``fmt`` ("json" or "text").

    Calling it again replaces the handler it installed before rather than adding a second.
    """
    if level.lower() not in _LEVELS:
        raise ValueError(f"log level {level!r} is invalid: choose one of {', '.join(_LEVELS)}")
    formatters = {"json": JsonFormatter, "text": TextFormatter}
    if fmt not in formatters:
        raise ValueError(f"log format {fmt!r} is invalid: choose json or text")
    handler = logging.StreamHandler(stream or sys.stdout)
    handler.setFormatter(formatters[fmt]())
    handler.addFilter(_ContextFilter())
    handler.set_name("autoglm")
    _installed[:] = [(level.lower(), fmt)]
    root = logging.getLogger()
    for old in [h for h in root.handlers if h.get_name() == "autoglm"]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(_LEVELS[level.lower()])
    for name in _UVICORN_LOGGERS:
        logger = logging.getLogger(name)
        logger.handlers.clear()
        logger.propagate = True
    return handler
