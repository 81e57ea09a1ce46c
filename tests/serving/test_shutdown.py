"""Graceful shutdown of a real ``python -m auto_glm.serving`` process."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.serving.conftest import free_port, wait_ready

pytestmark = [pytest.mark.integration, pytest.mark.slow]
REPO = Path(__file__).resolve().parents[2]


class ServerProcess:
    def __init__(self, checkpoint: Path, *flags: str) -> None:
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join(
                [str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])]
            ),
        }
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "auto_glm.serving",
                "--model",
                str(checkpoint),
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--device",
                "cpu",
                "--dtype",
                "float32",
                "--kv-cache-memory",
                "16MiB",
                "--log-level",
                "warning",
                *flags,
            ],
            env=env,
            cwd=REPO,
            start_new_session=True,  # its own process group, as a service manager starts it
        )
        wait_ready(self.base_url, timeout=120, alive=lambda: self.proc.poll() is None)


@pytest.fixture
def server_process(
    tiny_checkpoint: Path, request: pytest.FixtureRequest
) -> Iterator[ServerProcess]:
    server = ServerProcess(tiny_checkpoint, *request.param)
    yield server
    if server.proc.poll() is None:  # a failed test must not leave the server running
        server.proc.kill()
        server.proc.wait()


class Stream(threading.Thread):
    """A streamed completion read to the end in the background."""

    def __init__(self, base_url: str, max_tokens: int) -> None:
        super().__init__(daemon=True)
        self.base_url, self.max_tokens = base_url, max_tokens
        self.started = threading.Event()
        self.events: list[str] = []

    def run(self) -> None:
        body = {
            "prompt": "drain me",
            "max_tokens": self.max_tokens,
            "ignore_eos": True,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        with httpx.stream(
            "POST", f"{self.base_url}/v1/completions", json=body, timeout=120
        ) as response:
            for line in response.iter_lines():
                if line.startswith("data: "):
                    self.events.append(line[6:])
                    self.started.set()

    def chunks(self) -> list[dict]:
        assert self.events and self.events[-1] == "[DONE]", self.events[-3:]
        return [json.loads(e) for e in self.events[:-1]]


def start_streams(base_url: str, count: int, max_tokens: int) -> list[Stream]:
    streams = [Stream(base_url, max_tokens) for _ in range(count)]
    for stream in streams:
        stream.start()
    for stream in streams:
        assert stream.started.wait(60), "a stream got no first chunk"
    return streams


def _sigterm_drains(server: ServerProcess, count: int, max_tokens: int, to_group: bool) -> None:
    streams = start_streams(server.base_url, count=count, max_tokens=max_tokens)
    signalled = time.monotonic()
    if to_group:  # as a service manager stops it: every process of the group gets it
        os.killpg(server.proc.pid, signal.SIGTERM)
    else:
        server.proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + 5
    while httpx.get(f"{server.base_url}/ready").status_code != 503:
        assert time.monotonic() < deadline, "/ready did not turn 503 after SIGTERM"
        time.sleep(0.05)
    refused = httpx.post(f"{server.base_url}/v1/completions", json={"prompt": "late"})
    assert refused.status_code == 503 and refused.json()["error"]["code"] == "draining"
    assert any(s.is_alive() for s in streams), (
        f"the streams ended before the drain was checked, "
        f"{time.monotonic() - signalled:.2f} s after the signal: "
        f"{[(len(s.events), s.events[-2:]) for s in streams]}"
    )
    for stream in streams:
        stream.join(60)
        chunks = stream.chunks()
        assert chunks[-1]["usage"]["completion_tokens"] == max_tokens
        assert chunks[-2]["choices"][0]["finish_reason"] == "length"
    assert server.proc.wait(30) == 0


@pytest.mark.parametrize("server_process", [("--drain-timeout", "60")], indirect=True)
def test_sigterm_drains_in_flight_streams_then_exits_0(server_process: ServerProcess) -> None:
    _sigterm_drains(server_process, count=4, max_tokens=300, to_group=False)


def test_sigterm_to_the_group_drains_an_engine_process_then_exits_0(make_checkpoint) -> None:
    """The engine process leaves the signal to the server, which drains, then stops it. Its
    engine decodes far faster than one sharing the server's GIL: a longer context keeps
    the streams in flight while the drain is checked."""
    checkpoint = make_checkpoint("Glm4ForCausalLM", max_position_embeddings=LONG_CONTEXT)
    server = ServerProcess(checkpoint, "--drain-timeout", "60", "--engine-process")
    try:
        _sigterm_drains(server, count=2, max_tokens=3000, to_group=True)
    finally:
        if server.proc.poll() is None:
            server.proc.kill()
            server.proc.wait()


# Far more tokens than any CPU decodes within the drain: the drain timeout, not the
# generation, decides how the stream ends (480 tokens of the 512-token checkpoint could
# finish inside 0.5 s and make the outcome depend on the machine's speed).
LONG_CONTEXT = 65536
LONG_MAX_TOKENS = 60000


@pytest.fixture
def long_context_server(make_checkpoint) -> Iterator[ServerProcess]:
    checkpoint = make_checkpoint("Glm4ForCausalLM", max_position_embeddings=LONG_CONTEXT)
    server = ServerProcess(checkpoint, "--drain-timeout", "0.5", "--kv-cache-memory", "64MiB")
    yield server
    if server.proc.poll() is None:
        server.proc.kill()
        server.proc.wait()


def test_sigint_past_drain_timeout_ends_streams_with_an_error_then_exits_0(
    long_context_server: ServerProcess,
) -> None:
    [stream] = start_streams(long_context_server.base_url, count=1, max_tokens=LONG_MAX_TOKENS)
    signalled = time.monotonic()
    long_context_server.proc.send_signal(signal.SIGINT)
    stream.join(60)
    assert not stream.is_alive(), "the stream did not end after the drain timeout"
    chunks = stream.chunks()
    last = chunks[-1]
    assert last["error"]["code"] == "shutdown" and "drain_timeout" in last["error"]["message"]
    # cut short: no finish_reason, no usage, far fewer tokens than asked for
    assert not any(c.get("usage") for c in chunks)
    assert all(choice["finish_reason"] is None for c in chunks[:-1] for choice in c["choices"])
    assert len(chunks) - 1 < LONG_MAX_TOKENS
    assert long_context_server.proc.wait(30) == 0
    assert time.monotonic() - signalled < 30
