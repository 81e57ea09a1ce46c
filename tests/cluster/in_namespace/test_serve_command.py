"""``autoglm serve --ray`` as a user runs it: a local Ray instance, the application, and a
SIGTERM that drains the stream under way before the command exits 0."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import pytest

from auto_glm.checkpoints import demo_model_path

pytestmark = [pytest.mark.slow, pytest.mark.integration]
ROOT = Path(__file__).resolve().parents[3]


def test_sigterm_drains_the_stream_under_way_then_exits_0() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    command = [
        sys.executable,
        "-m",
        "auto_glm.serving",
        "--ray",
        "--model",
        str(demo_model_path()),
        "--port",
        str(port),
        "--num-replicas",
        "1",
        "--replica-cpus",
        "0.5",
        "--kv-cache-memory",
        "64MiB",
        "--device",
        "cpu",
        "--drain-timeout",
        "60",
        "--log-level",
        "warning",
    ]
    # Ray's socket paths must stay under 108 bytes: a short directory of its own
    ray_dir = tempfile.mkdtemp(prefix="ray-", dir="/tmp")
    env = {**os.environ, "RAY_TMPDIR": ray_dir, "RAY_USAGE_STATS_ENABLED": "0"}
    process = subprocess.Popen(command, cwd=ROOT, env=env)
    try:
        deadline = time.monotonic() + 120
        while True:
            assert process.poll() is None, "autoglm serve --ray exited before it was ready"
            assert time.monotonic() < deadline, "not ready within 120 s"
            try:
                if httpx.get(f"http://127.0.0.1:{port}/ready", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.5)
        body = {
            "prompt": "drain me",
            "max_tokens": 150,
            "ignore_eos": True,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        chunks, done, usage = 0, False, None
        with httpx.stream(
            "POST", f"http://127.0.0.1:{port}/v1/completions", json=body, timeout=120
        ) as response:
            buffer = ""
            for part in response.iter_text():
                buffer += part
                *events, buffer = buffer.split("\n\n")
                for event in events:
                    if event == "data: [DONE]":
                        done = True
                    elif event.startswith("data: "):
                        chunk = json.loads(event[6:])
                        assert "error" not in chunk, chunk
                        usage = chunk.get("usage") or usage
                        chunks += 1
                        if chunks == 5:  # the stream is under way: stop the server
                            process.send_signal(signal.SIGTERM)
        assert done and usage["completion_tokens"] == 150
        assert process.wait(90) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        shutil.rmtree(ray_dir, ignore_errors=True)
