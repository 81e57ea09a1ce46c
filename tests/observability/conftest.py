"""Live servers for the observability tests: a real engine behind the real app, on 127.0.0.1.

Each test gets fresh servers (the tiny model loads in well under a second), so metric values
start from zero and can be checked exactly.
"""

from __future__ import annotations

import logging
import shutil
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import httpx
import pytest
import uvicorn
from fastapi import FastAPI
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from prometheus_client.parser import text_string_to_metric_families

from auto_glm.api import GLMModel
from auto_glm.observability import Observability
from auto_glm.serving.app import create_app
from auto_glm.serving.config import ServerConfig

MODEL = "tiny-glm4"


@dataclass
class LiveServer:
    url: str
    app: FastAPI
    model: GLMModel
    observability: Observability

    def client(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=60)

    def metrics(self) -> dict[tuple[str, frozenset], float]:
        """Every sample of ``GET /metrics``: (name, labels) -> value."""
        text = httpx.get(f"{self.url}/metrics", timeout=10).text
        return {
            (s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text)
            for s in family.samples
        }


def sample(metrics: dict, name: str, **labels: str) -> float:
    """The sum of the series of ``name`` that have these labels (``model`` is filled in),
    over any others (per-request metrics also have ``tenant``); 0 when there is none yet."""
    wanted = {"model": MODEL, **labels}.items()
    return sum(
        value for (series, found), value in metrics.items() if series == name and wanted <= found
    )


def eventually(server: LiveServer, check, timeout: float = 10.0) -> dict:
    """Scrape until ``check(metrics)`` holds: the finish listener runs just after the
    engine hands a request's last output to its handler, so a scrape may beat it."""
    deadline = time.monotonic() + timeout
    while True:
        metrics = server.metrics()
        if check(metrics) or time.monotonic() > deadline:
            return metrics
        time.sleep(0.02)


def slow_steps(server: LiveServer, monkeypatch: pytest.MonkeyPatch, seconds: float) -> None:
    """Every engine step of ``server`` takes at least ``seconds`` more (a sleep before the
    model runs): latencies then have known lower bounds, whatever the machine's speed."""
    runner = server.model.engine.core.runner
    execute = runner.execute

    def slowed(plan):
        time.sleep(seconds)
        return execute(plan)

    monkeypatch.setattr(runner, "execute", slowed)


StartServer = Callable[..., LiveServer]


@pytest.fixture
def start_server(make_checkpoint) -> Iterator[StartServer]:
    """``start_server(span_exporter=None, log_level="info", config=None, **engine_options)
    -> LiveServer``; ``config`` holds further :class:`ServerConfig` settings."""
    started: list[tuple[uvicorn.Server, threading.Thread, GLMModel]] = []
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level

    def start(
        span_exporter=None, log_level: str = "info", config: dict | None = None, **engine_options
    ) -> LiveServer:
        model = GLMModel(
            str(make_checkpoint("Glm4ForCausalLM")),
            device="cpu",
            dtype="float32",
            kv_cache_memory=16 << 20,
            **engine_options,
        )
        settings = ServerConfig(served_model_name=MODEL, log_level=log_level, **(config or {}))
        app = create_app(model.engine, settings)
        # The real wiring only: the fixture never installs observability itself, so a
        # create_app that stops installing it fails these tests instead of being patched up.
        observability = getattr(app.state, "observability", None)
        if not isinstance(observability, Observability):
            model.close()
            pytest.fail("create_app did not install observability (app.state.observability)")
        if span_exporter is not None:
            observability.tracer_provider.add_span_processor(SimpleSpanProcessor(span_exporter))
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        server = uvicorn.Server(uvicorn.Config(app, log_config=None, access_log=False))
        thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
        thread.start()
        started.append((server, thread, model))
        deadline = time.monotonic() + 30
        while not server.started:
            if time.monotonic() > deadline or not thread.is_alive():
                raise RuntimeError("the test server did not start")
            time.sleep(0.01)
        return LiveServer(f"http://127.0.0.1:{sock.getsockname()[1]}", app, model, observability)

    yield start
    for server, thread, model in started:
        server.should_exit = True
        thread.join(timeout=30)
        model.close()
    root.handlers[:] = handlers
    root.setLevel(level)


@pytest.fixture(scope="session")
def prometheus_bin() -> str:
    """Debian's ``prometheus`` (and ``promtool``); the tests skip, saying why, without them.

    Installing is not the tests' business: ``.ci/run`` installs the package.
    """
    path = shutil.which("prometheus")
    missing = [tool for tool in ("prometheus", "promtool") if shutil.which(tool) is None]
    if missing:
        pytest.skip(
            f"{' and '.join(missing)} not on PATH: install Debian's prometheus package "
            "(apt-get install prometheus; .ci/run does this on CI)"
        )
    return path
