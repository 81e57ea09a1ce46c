"""Live servers for the observability tests: a real engine behind the real app, on 127.0.0.1.

Each test gets fresh servers (the tiny model loads in well under a second), so metric values
start from zero and can be checked exactly.
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
import subprocess
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
from auto_glm.observability import Observability, install_observability
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
    """The value of one series (``model`` is filled in); 0 when it does not exist yet."""
    return metrics.get((name, frozenset({"model": MODEL, **labels}.items())), 0.0)


StartServer = Callable[..., LiveServer]


@pytest.fixture
def start_server(make_checkpoint) -> Iterator[StartServer]:
    """``start_server(span_exporter=None, **engine_options) -> LiveServer``."""
    started: list[tuple[uvicorn.Server, threading.Thread, GLMModel]] = []
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level

    def start(span_exporter=None, log_level: str = "info", **engine_options) -> LiveServer:
        model = GLMModel(
            str(make_checkpoint("Glm4ForCausalLM")),
            device="cpu",
            dtype="float32",
            kv_cache_memory=16 << 20,
            **engine_options,
        )
        app = create_app(model.engine, ServerConfig(served_model_name=MODEL, log_level=log_level))
        observability = getattr(app.state, "observability", None)
        if observability is None:  # a serving layer that does not install it itself yet
            observability = install_observability(
                app, model.engine, model_name=MODEL, log_level=log_level
            )
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
    """Debian's ``prometheus`` (and ``promtool``), installed here when missing and we are root."""
    if (
        shutil.which("prometheus") is None
        and hasattr(os, "geteuid")
        and os.geteuid() == 0
        and shutil.which("apt-get")
    ):
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        subprocess.run(["apt-get", "update", "-qq"], env=env, capture_output=True, timeout=600)
        subprocess.run(
            ["apt-get", "install", "-y", "-qq", "--no-install-recommends", "prometheus"],
            env=env,
            capture_output=True,
            timeout=900,
        )
    path = shutil.which("prometheus")
    if path is None or shutil.which("promtool") is None:
        pytest.skip(
            "prometheus/promtool are not installed and could not be installed here "
            "(needs root and apt-get: apt-get install -y prometheus)"
        )
    return path
