"""Checks that run before any handler: the ``Host`` header, the request body's size, and
the admin key on ``/metrics`` when ``metrics_auth`` is on.

``RequestGuards`` is pure ASGI. It refuses a ``Host`` the server does not answer to (DNS
rebinding: a web page whose name resolves to 127.0.0.1 must not reach a loopback-only
server) and reads the body itself, up to ``max_request_bytes``, so an oversized upload is
refused with 413 as soon as it passes the limit (or at once, from ``Content-Length``)
instead of being buffered and parsed first. The handler then gets the body as it came.
"""

from __future__ import annotations

import hmac
import ipaddress
from collections.abc import Iterable

from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from auto_glm.serving.errors import APIError, clip
from auto_glm.serving.tenancy import key_from_headers

__all__ = ["RequestGuards", "is_loopback"]

_LOOPBACK_NAMES = frozenset({"localhost", "localhost.localdomain", "ip6-localhost"})


def is_loopback(host: str) -> bool:
    """Whether ``host`` (a name or address, IPv6 with or without brackets) is loopback."""
    name = host.strip().lower().removeprefix("[").removesuffix("]")
    if name in _LOOPBACK_NAMES or name.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def _host_name(header: str) -> str:
    """``example.com:8080`` -> ``example.com``; ``[::1]:8080`` -> ``::1``."""
    header = header.strip().lower()
    if header.startswith("["):
        return header[1:].partition("]")[0]
    if header.count(":") == 1:
        return header.partition(":")[0]
    return header


class RequestGuards:
    """Refuse foreign ``Host`` headers (when ``check_host``) and bodies over ``max_bytes``.

    ``allowed_hosts`` are names accepted besides loopback ones; ``*`` accepts any.
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        max_bytes: int,
        check_host: bool,
        allowed_hosts: Iterable[str] = (),
        metrics_key: str | None = None,
    ) -> None:
        self.app = app
        self.metrics_key = metrics_key
        self.max_bytes = max_bytes
        self.allowed_hosts = frozenset(allowed_hosts)
        self.check_host = check_host and "*" not in self.allowed_hosts

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        try:
            self._check_host(headers.get("host"))
            if self.metrics_key is not None and scope["path"] == "/metrics":
                self._check_metrics_key(headers)
            body = await self._read_body(headers, receive)
        except APIError as exc:
            await exc.response()(scope, receive, send)
            return
        if body is None:  # the client went away while sending
            return
        await self.app(scope, _replay(body, receive), send)

    def _check_host(self, header: str | None) -> None:
        if not self.check_host or header is None:
            return
        name = _host_name(header)
        if is_loopback(name) or name in self.allowed_hosts:
            return
        raise APIError(
            403,
            f"Host {clip(header, 64)!r} is not served here: this server answers to loopback "
            "names only; add the name to allowed_hosts (--allowed-hosts, "
            "AUTOGLM_ALLOWED_HOSTS) if clients really use it",
            code="host_not_allowed",
        )

    def _check_metrics_key(self, headers: Headers) -> None:
        key = key_from_headers(headers.get("authorization"), headers.get("x-api-key"))
        if key is None or not hmac.compare_digest(key.encode(), self.metrics_key.encode()):
            raise APIError(
                401,
                "/metrics needs the admin key (metrics_auth is on): send Authorization: "
                "Bearer ADMIN_KEY, e.g. Prometheus' authorization.credentials",
                code="invalid_api_key",
                headers={"WWW-Authenticate": "Bearer"},
            )

    def _too_large(self, size: str) -> APIError:
        return APIError(
            413,
            f"request body is {size}, over max_request_bytes={self.max_bytes}; send a "
            "smaller request, or raise max_request_bytes (--max-request-bytes)",
            code="request_too_large",
        )

    async def _read_body(self, headers: Headers, receive: Receive) -> bytes | None:
        declared = headers.get("content-length", "")
        if declared.isdigit() and int(declared) > self.max_bytes:
            raise self._too_large(f"{int(declared)} bytes (Content-Length)")
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                raise self._too_large(f"at least {size} bytes")
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)


def _replay(body: bytes, receive: Receive) -> Receive:
    """A ``receive`` that hands out ``body`` once, then waits on the real one (disconnect)."""
    pending = True

    async def replayed() -> Message:
        nonlocal pending
        if pending:
            pending = False
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replayed
