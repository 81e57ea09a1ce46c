"""Front-end errors as gRPC statuses: the same message as REST, a code for the category.

A call over a limit gets ``RESOURCE_EXHAUSTED`` with its retry delay twice: as the
``retry-after`` trailing metadata (seconds, like the REST header) and as a
``google.rpc.RetryInfo`` in the rich status details that grpc-status clients read.
"""

from __future__ import annotations

import grpc
from google.protobuf.duration_pb2 import Duration
from google.rpc import code_pb2, error_details_pb2, status_pb2

from auto_glm.serving.errors import APIError

__all__ = ["CODES", "grpc_code", "trailing_metadata"]

CODES: dict[int, grpc.StatusCode] = {
    400: grpc.StatusCode.INVALID_ARGUMENT,
    401: grpc.StatusCode.UNAUTHENTICATED,
    403: grpc.StatusCode.PERMISSION_DENIED,
    404: grpc.StatusCode.NOT_FOUND,
    409: grpc.StatusCode.FAILED_PRECONDITION,
    413: grpc.StatusCode.INVALID_ARGUMENT,
    422: grpc.StatusCode.INVALID_ARGUMENT,
    429: grpc.StatusCode.RESOURCE_EXHAUSTED,
    499: grpc.StatusCode.CANCELLED,
    500: grpc.StatusCode.INTERNAL,
    503: grpc.StatusCode.UNAVAILABLE,
    504: grpc.StatusCode.DEADLINE_EXCEEDED,
}


def grpc_code(error: APIError) -> grpc.StatusCode:
    return CODES.get(error.status, grpc.StatusCode.UNKNOWN)


def trailing_metadata(error: APIError) -> tuple[tuple[str, str | bytes], ...]:
    """The error's metadata (lower-cased names), its code, and for a retryable refusal the
    ``google.rpc.Status`` details with a ``RetryInfo``."""
    pairs: list[tuple[str, str | bytes]] = [
        (name.lower(), value) for name, value in error.headers.items()
    ]
    if error.code:
        pairs.append(("autoglm-error-code", error.code))
    if error.param:
        pairs.append(("autoglm-error-param", error.param))
    retry = error.headers.get("Retry-After")
    if retry is not None:
        info = error_details_pb2.RetryInfo(retry_delay=Duration(seconds=int(float(retry))))
        status = status_pb2.Status(
            code=code_pb2.RESOURCE_EXHAUSTED if error.status == 429 else code_pb2.UNAVAILABLE,
            message=error.message,
        )
        status.details.add().Pack(info)
        pairs.append(("grpc-status-details-bin", status.SerializeToString()))
    return tuple(pairs)
