"""Servers on the model registry: versions registered in a real SQLite file (copies under a
temporary registry root), served by ``GLMService`` on 127.0.0.1 in a background thread, as
``autoglm serve --registry DIR --serve NAME`` builds them."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai
import pytest

from auto_glm.fleet import ModelTable
from auto_glm.registry import ModelRegistry
from auto_glm.serving import GLMService, ServerConfig
from auto_glm.serving.table_setup import build_table
from tests.serving.conftest import free_port, wait_ready

ADMIN_KEY = "admin-key-for-tests-0123456789"
KV = 16 << 20  # per served model


@dataclass
class Registry:
    url: str
    root: Path
    store: ModelRegistry

    def settings(self, serve: list[str], **more) -> ServerConfig:
        kv = more.pop("kv_cache_memory", KV * len(serve))
        return ServerConfig(
            host="127.0.0.1",
            port=free_port(),
            log_level="warning",
            database_url=self.url,
            registry_dir=str(self.root),
            serve=serve,
            admin_key=ADMIN_KEY,
            device="cpu",
            dtype="float32",
            kv_cache_memory=kv,
            **more,
        )


@dataclass
class FleetServer:
    base_url: str
    service: GLMService
    thread: threading.Thread

    @property
    def table(self) -> ModelTable:
        return self.service.table

    def client(self, **kwargs) -> httpx.Client:
        return httpx.Client(base_url=self.base_url, timeout=60, **kwargs)

    def admin(self) -> httpx.Client:
        return self.client(headers={"Authorization": f"Bearer {ADMIN_KEY}"})

    def openai(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.base_url}/v1", api_key="unused", max_retries=0)

    def async_openai(self) -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(
            base_url=f"{self.base_url}/v1", api_key="unused", max_retries=0, timeout=120
        )


def start_fleet(config: ServerConfig) -> FleetServer:
    table = build_table(config)
    service = GLMService(table=table, config=config)
    thread = threading.Thread(target=asyncio.run, args=(service.serve(),), daemon=True)
    thread.start()
    server = FleetServer(f"http://127.0.0.1:{config.port}", service, thread)
    wait_ready(server.base_url, alive=thread.is_alive)
    return server


def stop_fleet(server: FleetServer) -> None:
    server.service.admission.begin_drain()
    server.thread.join(timeout=30)
    server.table.close()
    assert not server.thread.is_alive(), "the server did not stop after draining"


@pytest.fixture
def registry(tmp_path: Path, make_checkpoint) -> Iterator[Registry]:
    """A registry holding chat@v1 and chat@v2 (different weights) and other@v1 (another
    architecture), each copied under the registry root so tests may damage them."""
    url = f"sqlite:///{tmp_path / 'autoglm.db'}"
    with ModelRegistry(url, tmp_path / "models") as store:
        store.add("chat", make_checkpoint("Glm4ForCausalLM"), "v1", copy=True)
        store.add("chat", make_checkpoint("Glm4ForCausalLM", seed=1), "v2", copy=True)
        store.add("other", make_checkpoint("Qwen3ForCausalLM"), "v1", copy=True)
        yield Registry(url, tmp_path / "models", store)


@pytest.fixture
def fleet(registry: Registry) -> Iterator[FleetServer]:
    """chat (v1 serving) and other, sharing 32 MiB of KV cache."""
    server = start_fleet(registry.settings(["chat@v1", "other"]))
    yield server
    stop_fleet(server)
