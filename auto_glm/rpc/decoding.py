"""Requests that are not valid protobuf: refused as INVALID_ARGUMENT, as REST refuses a body
that is not JSON or not UTF-8, and observed as any call is.

gRPC decodes a request before the handler runs, and a message it cannot decode (a string
field that is not UTF-8, a corrupt wire format) ended the call with UNKNOWN, unlogged and
uncounted. :class:`TolerantDecoding` decodes the service's requests itself: what fails is
handed to the handler as an :class:`Undecodable`, which :func:`decoded` turns into a 400.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import grpc
from google.protobuf.message import DecodeError

from auto_glm.serving.errors import APIError

__all__ = ["TolerantDecoding", "Undecodable", "decoded"]


class Undecodable:
    """The bytes of a request that ``message_type`` could not decode, and why."""

    def __init__(self, message_type: str, reason: str) -> None:
        self.message_type = message_type
        self.reason = reason


def decoded(request: Any) -> Any:
    """``request``, or APIError 400 ``invalid_message`` where it could not be decoded."""
    if isinstance(request, Undecodable):
        raise APIError(
            400,
            f"the request is not a valid {request.message_type} message ({request.reason}); "
            "string fields must be UTF-8: build it with the autoglm.v1 stubs",
            code="invalid_message",
        )
    return request


def _tolerant(decode: Callable[[bytes], Any], message_type: str) -> Callable[[bytes], Any]:
    def tolerant(data: bytes) -> Any:
        try:
            return decode(data)
        except DecodeError as exc:
            return Undecodable(message_type, str(exc))

    return tolerant


class TolerantDecoding(grpc.aio.ServerInterceptor):
    """Decodes the requests of ``service``'s methods, whose handlers call :func:`decoded`;
    ``message_types`` maps each method's name to its request's full type name."""

    def __init__(self, service: str, message_types: dict[str, str]) -> None:
        self.prefix = f"/{service}/"
        self.message_types = message_types

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        method = details.method.removeprefix(self.prefix)
        if handler is None or method not in self.message_types or method == details.method:
            return handler
        decode = _tolerant(handler.request_deserializer, self.message_types[method])
        return handler._replace(request_deserializer=decode)
