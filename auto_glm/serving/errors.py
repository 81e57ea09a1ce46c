"""Every failure leaves the server as an OpenAI-shaped ``{"error": {...}}`` body.

Status codes, consistently:

* 400 ``invalid_request_error``: the body is not JSON (or not UTF-8, or nested too deep),
  holds text that is not valid Unicode, or is well-formed but cannot be served (prompt
  longer than the context, token id outside the vocabulary, ...).
* 422 ``invalid_request_error``: the JSON does not match the schema (wrong type, unknown
  field, out-of-range value); ``param`` names the field.
* 403 ``permission_error``: a ``Host`` header the server does not answer to. 413: the
  body is over ``max_request_bytes``. 415: the body was sent as another media type than
  JSON (``curl -d`` without ``-H 'Content-Type: application/json'``); such bodies are
  never read as JSON, so a browser's form on another site cannot call the API.
* 404 ``not_found_error``: unknown model or path. 429 ``rate_limit_error``: the waiting
  queue is full (with ``Retry-After``). 503 ``service_unavailable``: draining, the engine
  died, or tenants' keys or limits cannot be checked now. 504 ``timeout_error``:
  ``request_timeout`` passed. 500 ``server_error``: a bug.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Mapping
from email.message import Message

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from auto_glm.engine.client import EngineRequestError
from auto_glm.engine.core import EngineDeadError
from auto_glm.engine.inputs import RequestInputError
from auto_glm.observability.exchange import Exchange, exchange_of
from auto_glm.serving.diagnose import json_kind
from auto_glm.serving.responses import ErrorBody, ErrorResponse

__all__ = [
    "ERROR_RESPONSES",
    "VERSION_HEADER",
    "APIError",
    "clip",
    "install_error_handlers",
    "prompt_error",
    "routed_error",
    "to_api_error",
    "validation_error",
]

# the model version that served a call (or refused it, once routed): on every inference
# response, errors included
VERSION_HEADER = "X-AutoGLM-Model-Version"

log = logging.getLogger("auto_glm.serving")
_TYPES = {
    400: "invalid_request_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
    503: "service_unavailable",
    504: "timeout_error",
}
# documented in the OpenAPI schema of every generating endpoint
ERROR_RESPONSES: dict[int | str, dict] = {
    code: {"model": ErrorResponse, "description": text}
    for code, text in {
        400: "Malformed JSON, or a request that cannot be served (e.g. prompt too long)",
        403: "Host header not allowed (see allowed_hosts)",
        404: "Unknown model",
        413: "Body over max_request_bytes",
        415: "Body not sent as JSON (Content-Type: application/json)",
        422: "Body does not match the schema; `param` names the field",
        429: "Waiting queue full; retry after `Retry-After` seconds",
        503: "Server draining or engine stopped",
        504: "request_timeout exceeded",
    }.items()
}


# Validation errors about the content of a value, not its type or shape: 400, like OpenAI.
BAD_CONTENT_ERRORS = frozenset({"invalid_unicode", "string_unicode"})
_HTTP_CODES = {404: "not_found", 405: "method_not_allowed"}
# What FastAPI's generic "error parsing the body" (400) was caused by.
_BODY_CAUSES = (
    (
        UnicodeDecodeError,
        "invalid_utf8",
        "request body is not valid UTF-8 ({cause}); encode the JSON as UTF-8",
    ),
    (
        RecursionError,
        "json_too_deep",
        "request body nests JSON too deeply to parse; no field of this API nests more than "
        "a few levels",
    ),
)


def clip(text: str, limit: int) -> str:
    """``text`` cut to ``limit`` characters, saying how long it was: safe to echo back."""
    if len(text) <= limit:
        return text
    return f"{text[:limit]}... ({len(text)} characters)"


class APIError(Exception):
    """A refusal or failure the caller should see, from any layer of the front end.

    ``status`` is its category, numbered as HTTP statuses (400 bad input, 401/403 auth, 404
    unknown, 429 over a limit, 503 unavailable, 504 timed out, ...): REST sends it as it is,
    gRPC maps it to a status code (:mod:`auto_glm.rpc.status`). ``headers`` is metadata for
    the caller (``Retry-After``, rate limits): HTTP headers, or gRPC trailing metadata.
    """

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.headers = dict(headers or {})

    def body(self) -> ErrorResponse:
        fallback = "server_error" if self.status >= 500 else "invalid_request_error"
        kind = _TYPES.get(self.status, fallback)
        return ErrorResponse(
            error=ErrorBody(message=self.message, type=kind, param=self.param, code=self.code)
        )

    def response(self) -> JSONResponse:
        return JSONResponse(self.body().model_dump(), status_code=self.status, headers=self.headers)


def to_api_error(exc: BaseException) -> APIError:
    """Map what the engine raises onto what the client is told."""
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, EngineDeadError):
        return APIError(503, f"{exc}", code="engine_dead")
    if isinstance(exc, EngineRequestError):
        return APIError(500, f"the engine failed this request: {exc}", code="engine_error")
    if isinstance(exc, RequestInputError):  # the request's fault, found while it ran
        return APIError(400, str(exc), code=exc.code)
    if isinstance(exc, ValueError):
        return APIError(400, str(exc), code="invalid_value")
    log.error("unexpected error while serving a request", exc_info=exc)
    return APIError(
        500,
        f"internal server error ({type(exc).__name__}); see the server log",
        code="internal_error",
    )


def prompt_error(exc: ValueError, param: str | None) -> APIError:
    """A 400 for a prompt the engine refuses, naming ``param``, the field it came from:
    ``context_length_exceeded`` (as OpenAI names it) when it does not fit the context,
    the engine's own code for another input error, else ``invalid_prompt``."""
    code = exc.code if isinstance(exc, RequestInputError) else "invalid_prompt"
    return APIError(400, str(exc), param=param, code=code)


def routed_error(exc: BaseException, exchange: Exchange | None) -> APIError:
    """:func:`to_api_error`, naming in :data:`VERSION_HEADER` the model version that the
    call was routed to, if it got that far (limits such as ``max_model_len`` are the
    version's, and a canary's errors are told apart from the stable version's)."""
    error = to_api_error(exc)
    if exchange is not None:  # the metrics count refusals by their code
        exchange.error_code = error.code
    version = exchange.version if exchange is not None else None
    if version is None or VERSION_HEADER in error.headers:
        return error
    headers = {**error.headers, VERSION_HEADER: version}
    return APIError(
        error.status, error.message, param=error.param, code=error.code, headers=headers
    )


def _field(loc: tuple) -> tuple[str, ...]:
    return tuple(str(p) for p in (loc[1:] if loc and loc[0] == "body" else loc))


def validation_error(errors: list[dict]) -> APIError:
    """The error of a request that does not match its schema (pydantic's ``errors()``):
    400 for malformed JSON or content this API diagnoses, else 422; ``param`` names the
    field. Shared by REST (FastAPI's validation) and gRPC (the same models)."""
    errors = errors or [{"loc": (), "msg": "invalid request", "type": "invalid"}]
    first = errors[0]
    if first["type"] == "json_invalid":
        detail = first.get("ctx", {}).get("error", "")
        return APIError(
            400,
            f"request body is not valid JSON ({detail}); send a JSON object",
            code="json_invalid",
        )
    # A value that fits no member of a union (prompt: text | ids | ...) yields one error per
    # member, each with the member's name appended: report their common field once.
    path = _field(first["loc"])
    same = [e for e in errors if _field(e["loc"])[:1] == path[:1]]
    for other in same[1:]:
        loc = _field(other["loc"])
        while path and loc[: len(path)] != path:
            path = path[:-1]
    param = ".".join(path) or None
    # A value this API diagnoses itself (see protocol.py) says where inside it the problem
    # is, e.g. prompt[3].
    at = (first.get("ctx") or {}).get("at", "")
    message = f"{param or 'body'}{at}: {first['msg']}"
    if len(same) > 1:
        message = f"{param or 'body'} has an invalid value or type (first problem: {first['msg']})"
    if len(errors) > len(same):
        message += f"; and {len(errors) - len(same)} more problem(s) in other fields"
    status = 400 if first["type"] in BAD_CONTENT_ERRORS else 422
    return APIError(status, message, param=param, code=first["type"])


def _is_json(content_type: str) -> bool:
    """Whether FastAPI reads a body of this media type as JSON (application/json or
    application/*+json, any parameters)."""
    header = Message()
    header["content-type"] = content_type
    subtype = header.get_content_subtype()
    return header.get_content_maintype() == "application" and (
        subtype == "json" or subtype.endswith("+json")
    )


def _whole_body_error(request: Request, errors: list[dict]) -> APIError | None:
    """The error of a body that is not a JSON object at all, said plainly: sent as another
    media type (FastAPI then hands the schema raw bytes), absent, or JSON of another kind;
    None when the problem is inside the object."""
    first = errors[0] if errors else None
    if first is None or _field(tuple(first["loc"])):
        return None
    content_type = request.headers.get("content-type")
    if content_type and not _is_json(content_type):
        return APIError(
            415,
            f"request body must be JSON sent with Content-Type: application/json, got "
            f"Content-Type: {clip(content_type, 100)}; with curl, add "
            "-H 'Content-Type: application/json' (-d alone sends "
            "application/x-www-form-urlencoded)",
            code="unsupported_media_type",
        )
    if content_type is None and isinstance(first.get("input"), bytes):
        # not read as JSON without the header: a page in a browser could send that cross-site
        return APIError(
            415,
            "request body must be JSON sent with Content-Type: application/json, and this "
            "request has no Content-Type header; add it (Python requests: json=BODY rather "
            "than data=TEXT)",
            code="unsupported_media_type",
        )
    if first["type"] == "missing":
        return APIError(
            422,
            "request body is empty; send a JSON object with the request's fields",
            code="missing_body",
        )
    if "input" in first:
        return APIError(
            422,
            f"request body must be a JSON object with the request's fields, got "
            f"{json_kind(first['input'])}",
            code="body_not_object",
        )
    return None


async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
    errors = list(exc.errors())
    return (_whole_body_error(request, errors) or validation_error(errors)).response()


async def _http(_: Request, exc: HTTPException) -> JSONResponse:
    code = _HTTP_CODES.get(exc.status_code, f"http_{exc.status_code}")
    message = str(exc.detail)
    cause = exc.__cause__
    if exc.status_code == 400 and cause is not None:  # FastAPI could not read the body
        code, message = "invalid_body", f"request body could not be read as JSON ({cause})"
        for kind, kind_code, text in _BODY_CAUSES:
            if isinstance(cause, kind):
                code, message = kind_code, text.format(cause=cause)
        if isinstance(cause, ValueError) and "integer string conversion" in str(cause):
            # Python's message advises raising a limit of the server, not what the client can do
            code = "number_too_long"
            message = (
                f"request body holds a number of more than {sys.get_int_max_str_digits()} "
                "digits; no field of this API takes one that long"
            )
    return APIError(
        exc.status_code, message, code=code, headers=getattr(exc, "headers", None)
    ).response()


async def _api(request: Request, exc: APIError) -> JSONResponse:
    return routed_error(exc, exchange_of(request)).response()


async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    return routed_error(exc, exchange_of(request)).response()


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(APIError, _api)
    app.add_exception_handler(RequestValidationError, _validation)
    app.add_exception_handler(HTTPException, _http)
    app.add_exception_handler(Exception, _unexpected)
