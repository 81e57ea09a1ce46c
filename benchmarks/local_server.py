"""A GLMService on its own event loop in a background thread, for the benchmarks' clients."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import httpx

from auto_glm.serving import GLMService

__all__ = ["free_port", "serving", "wait_ready"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _ready(base_url: str) -> bool:
    try:
        return httpx.get(f"{base_url}/ready", timeout=1).status_code == 200
    except httpx.TransportError:
        return False


def wait_ready(base_url: str, alive: Callable[[], bool], timeout: float = 180.0) -> None:
    """Until ``base_url`` answers ``/ready``; raises when ``alive()`` turns false first or
    ``timeout`` seconds pass."""
    deadline = time.monotonic() + timeout
    while not _ready(base_url):
        if not alive():
            raise RuntimeError(f"the server behind {base_url} exited before it was ready")
        if time.monotonic() > deadline:
            raise TimeoutError(f"{base_url} not ready within {timeout} s")
        time.sleep(0.1)


@contextmanager
def serving(service: GLMService) -> Iterator[str]:
    """Serve ``service`` until the block ends (then drain it); yields its base URL once it
    is ready, or raises when it is not within 120 s."""
    thread = threading.Thread(target=asyncio.run, args=(service.serve(),), daemon=True)
    thread.start()
    base_url = f"http://127.0.0.1:{service.config.port}"
    try:
        wait_ready(base_url, thread.is_alive, timeout=120)
        yield base_url
    finally:
        service.admission.begin_drain()
        thread.join(timeout=60)
