"""Start-up checks and the start-up summary line of ``autoglm serve``.

:func:`check_listen_address` binds the server's host and port once and lets go, so a port
that another process holds fails in a fraction of a second, before minutes of model
loading. :func:`log_startup_summary` writes one ``info`` line, once the server listens,
with what an operator needs to know about the running server: the model, its precisions and
device, the KV cache size and every request limit.
"""

from __future__ import annotations

import errno
import logging
import socket
from typing import TYPE_CHECKING, Any

from auto_glm.serving.config import ServerConfig

if TYPE_CHECKING:  # the port check runs before torch is imported, to fail fast
    from auto_glm.fleet import ModelTable

__all__ = ["ListenError", "check_listen_address", "log_startup_summary", "startup_summary"]

log = logging.getLogger("auto_glm.serving")


class ListenError(OSError):
    """The server cannot listen on its host and port; the message names the setting and fix."""


def check_listen_address(host: str, port: int, sources: dict[str, str] | None = None) -> None:
    """Raise :class:`ListenError` unless ``host:port`` can be bound right now.

    Bound the way uvicorn (asyncio's ``create_server``) binds it: every address ``host``
    resolves to, with ``SO_REUSEADDR`` (a port left in TIME_WAIT by a previous run is free)
    and IPv6 sockets IPv6-only; an address family the machine lacks is skipped. ``sources``
    says where ``host`` and ``port`` came from (``{"port": "--port"}``) for the message.
    """
    where = {"host": "default", "port": "default", **(sources or {})}
    try:
        candidates = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
    except socket.gaierror as exc:
        raise ListenError(
            f"cannot listen on {host}:{port}: host={host!r} (from {where['host']}) does not "
            f"resolve ({exc.strerror}); pass an address of this machine with --host, e.g. "
            "127.0.0.1 or 0.0.0.0"
        ) from None
    unavailable = None
    bound = 0
    for family, kind, proto, _, sockaddr in candidates:
        with socket.socket(family, kind, proto) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            try:
                sock.bind(sockaddr)
            except OSError as exc:
                if exc.errno != errno.EADDRNOTAVAIL:
                    raise ListenError(_bind_failure(host, port, exc, where)) from None
                unavailable = exc
            else:
                bound += 1
    if not bound and unavailable is not None:
        raise ListenError(_bind_failure(host, port, unavailable, where))


def _bind_failure(host: str, port: int, exc: OSError, where: dict[str, str]) -> str:
    setting = where.get("setting", "port")  # or grpc_port
    flag, env = "--" + setting.replace("_", "-"), f"$AUTOGLM_{setting.upper()}"
    if exc.errno == errno.EADDRINUSE:
        fix = (
            f"port {port} (from {where['port']}) is taken by another process; stop it, or "
            f"choose a free port with {flag} (or {env}, or `{setting}:` in the config file)"
        )
    elif exc.errno == errno.EACCES:
        fix = (
            f"port {port} (from {where['port']}) is below 1024 and needs extra privileges; "
            f"choose a port of 1024 or above with {flag}"
        )
    else:
        fix = (
            f"host={host!r} (from {where['host']}) is not an address of this machine; pass "
            "one with --host, e.g. 127.0.0.1 or 0.0.0.0"
        )
    return f"cannot listen on {host}:{port}: {exc.strerror or exc}; {fix}"


def _engine_facts(name: str, version: str, engine: Any) -> dict[str, Any]:
    loaded = engine.loaded
    blocks = engine.num_blocks
    return {
        "model": name,
        "version": version,
        "model_path": str(loaded.path),
        "dtype": str(loaded.weight_dtype).removeprefix("torch."),
        "compute_dtype": str(loaded.dtype).removeprefix("torch."),
        "quantization": loaded.quantization,
        "device": str(loaded.device),
        "kv_cache_blocks": blocks,
        "kv_cache_tokens": blocks * engine.config.block_size,
        "kv_cache_bytes": engine.kv_cache_bytes,
        "max_model_len": engine.max_model_len,
    }


def startup_summary(table: ModelTable, config: ServerConfig) -> dict[str, Any]:
    """The facts of the start-up line: the default model's precisions, device and KV cache
    (every loaded version's under ``models``), and the limits."""
    loaded = [
        _engine_facts(served.model, served.version, served.engine) for served in table.loaded()
    ]
    default = next((f for f in loaded if f["model"] == table.default_model), {})
    engine_config = next(iter(table.loaded())).engine.config
    return {
        "url": f"http://{config.host}:{config.port}",
        "grpc": None if config.grpc_port is None else f"{config.host}:{config.grpc_port}",
        **default,
        "models": loaded,
        "max_num_seqs": engine_config.max_num_seqs,
        "max_num_batched_tokens": engine_config.max_num_batched_tokens,
        "max_queued_requests": config.max_queued_requests,
        "request_timeout": config.request_timeout,
        "max_request_bytes": int(config.max_request_bytes),
        "max_prompt_chars": config.max_prompt_chars,
        "max_images_per_request": config.max_images_per_request,
        "max_image_pixels": config.max_image_pixels,
        "max_image_bytes": int(config.max_image_bytes),
        "allowed_media_domains": ",".join(config.allowed_media_domains),
        "queue_policy": engine_config.queue_policy,
        "auth": config.auth,
    }


def log_startup_summary(table: ModelTable, config: ServerConfig) -> None:
    """Log :func:`startup_summary` as one ``server started`` line at ``info``."""
    log.info("server started", extra=startup_summary(table, config))
