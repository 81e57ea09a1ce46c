"""Real servers for the serving tests: uvicorn on 127.0.0.1, a tiny GLM-4 checkpoint.

``served`` runs :class:`GLMService` on its own event loop in a background thread of the
test process, so tests can look at the engine (KV usage, admission) while they talk HTTP
to it. The shutdown tests start ``python -m auto_glm.serving`` as a real subprocess.
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai
import pytest

from auto_glm.api import GLMModel
from auto_glm.serving import GLMService, ServerConfig
from auto_glm.serving.admission import Admission

TINY_KV = 16 << 20  # tiny model: 512 bytes per token, so 32k tokens


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_ready(
    base_url: str, timeout: float = 60.0, alive: Callable[[], bool] = lambda: True
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert alive(), "the server exited before it became ready"
        try:
            if httpx.get(f"{base_url}/ready", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise TimeoutError(f"{base_url} did not become ready within {timeout} s")


@dataclass
class Served:
    base_url: str
    model: GLMModel
    service: GLMService

    @property
    def name(self) -> str:
        return self.service.app.state.serving.model_name

    @property
    def admission(self) -> Admission:
        return self.service.admission

    def openai(self, **kwargs) -> openai.OpenAI:
        return openai.OpenAI(
            base_url=f"{self.base_url}/v1", api_key="unused", max_retries=0, **kwargs
        )

    def async_openai(self) -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(base_url=f"{self.base_url}/v1", api_key="unused", max_retries=0)

    def wait_idle(self, timeout: float = 15.0) -> None:
        """Until nothing is in flight and every KV block is free again."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            stats = self.model.engine.stats()
            if (
                not self.admission.num_in_flight
                and not stats.num_running
                and not stats.num_waiting
                and stats.kv_usage == 0
            ):
                return
            time.sleep(0.05)
        raise AssertionError(
            f"server not idle after {timeout} s: {self.model.engine.stats()}, "
            f"{self.admission.num_in_flight} call(s) in flight"
        )


class EngineGate:
    """Holds the engine loop inside its next model step until :meth:`release`.

    While it is held, nothing the server accepts can leave the waiting queue, so what
    admission takes and refuses does not depend on how fast the engine runs.
    """

    def __init__(self, served, monkeypatch: pytest.MonkeyPatch) -> None:
        # ``served``: anything with the ``model`` it serves (Served, LiveServer)
        self.entered, self._open = threading.Event(), threading.Event()
        runner = served.model.engine.core.runner
        execute = runner.execute

        def held(plan):
            self.entered.set()
            self._open.wait(60)
            return execute(plan)

        monkeypatch.setattr(runner, "execute", held)

    def release(self) -> None:
        self._open.set()


def hang_up_streams(base_url: str, count: int, after: int = 3) -> list[int]:
    """Start ``count`` streamed completions of 400 tokens at once and leave each after
    ``after`` events, without reading the rest; the events each received."""

    async def hang_up(client: httpx.AsyncClient, index: int) -> int:
        body = {"prompt": f"stream {index}", "max_tokens": 400, "ignore_eos": True, "stream": True}
        async with client.stream("POST", "/v1/completions", json=body) as response:
            assert response.status_code == 200
            received = 0
            async for line in response.aiter_lines():
                received += line.startswith("data: {")
                if received == after:  # mid-way: leave without reading the rest
                    break
        return received

    async def run() -> list[int]:
        limits = httpx.Limits(max_connections=count)
        async with httpx.AsyncClient(base_url=base_url, timeout=60, limits=limits) as client:
            return await asyncio.gather(*(hang_up(client, i) for i in range(count)))

    return asyncio.run(run())


def until(condition, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.01)


def start_service(checkpoint: Path, **settings) -> tuple[Served, threading.Thread]:
    settings = {"kv_cache_memory": TINY_KV, **settings}
    config = ServerConfig(host="127.0.0.1", port=free_port(), log_level="warning", **settings)
    model = GLMModel(str(checkpoint), device="cpu", dtype="float32", **config.engine_options())
    service = GLMService(model, config=config)
    thread = threading.Thread(target=asyncio.run, args=(service.serve(),), daemon=True)
    thread.start()
    served = Served(f"http://127.0.0.1:{config.port}", model, service)
    wait_ready(served.base_url, alive=thread.is_alive)
    return served, thread


def stop_service(served: Served, thread: threading.Thread) -> None:
    served.admission.begin_drain()  # the service's own shutdown path, without a signal
    thread.join(timeout=30)
    served.model.close()
    assert not thread.is_alive(), "the server did not stop after draining"


@pytest.fixture(scope="session")
def served(tiny_checkpoint: Path) -> Iterator[Served]:
    served, thread = start_service(tiny_checkpoint, max_num_seqs=16, max_queued_requests=64)
    yield served
    stop_service(served, thread)
