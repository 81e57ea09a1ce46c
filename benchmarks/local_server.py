"""A GLMService on its own event loop in a background thread, for the benchmarks' clients."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import httpx

from auto_glm.serving import GLMService

__all__ = ["free_port", "serving"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _ready(base_url: str) -> bool:
    try:
        return httpx.get(f"{base_url}/ready", timeout=1).status_code == 200
    except httpx.TransportError:
        return False


@contextmanager
def serving(service: GLMService) -> Iterator[str]:
    """Serve ``service`` until the block ends (then drain it); yields its base URL once it
    is ready, or raises RuntimeError when it is not within 120 s."""
    thread = threading.Thread(target=asyncio.run, args=(service.serve(),), daemon=True)
    thread.start()
    base_url = f"http://127.0.0.1:{service.config.port}"
    try:
        deadline = time.monotonic() + 120
        while not _ready(base_url):
            if not thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the server at {base_url} did not become ready")
            time.sleep(0.1)
        yield base_url
    finally:
        service.admission.begin_drain()
        thread.join(timeout=60)
