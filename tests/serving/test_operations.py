"""Operating the server: versions, offline docs, route labels, the port check, start-up line."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
import torch
import transformers
from prometheus_client.parser import text_string_to_metric_families

import auto_glm
from auto_glm import cli
from auto_glm.serving import load_config
from tests.serving.conftest import Served, free_port, wait_ready

REPO = Path(__file__).resolve().parents[2]
ENV = {
    **os.environ,
    "PYTHONPATH": os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])]),
}


def test_default_host_is_loopback_only() -> None:
    assert load_config(environ={}).host == "127.0.0.1"
    assert load_config(environ={"AUTOGLM_HOST": "0.0.0.0"}).host == "0.0.0.0"


def test_cli_version_is_instant_and_names_the_libraries() -> None:
    result = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "auto_glm.cli", "--version"],
        env=ENV,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"autoglm {auto_glm.__version__} (")
    assert f"torch {torch.__version__}" in result.stdout
    assert f"transformers {transformers.__version__}" in result.stdout
    assert result.stdout.count("\n") == 1  # one line, whatever the terminal width
    imported = {line.rsplit("|", 1)[-1].strip() for line in result.stderr.splitlines()}
    assert "torch" not in imported and "transformers" not in imported


def test_cli_version_in_process(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.startswith(f"autoglm {auto_glm.__version__} ")


def test_version_endpoint(served: Served) -> None:
    response = httpx.get(f"{served.base_url}/version")
    assert response.status_code == 200
    body = response.json()
    assert body["version"] == auto_glm.__version__
    assert body["torch"] == torch.__version__
    assert body["torch_cuda"] == torch.version.cuda
    assert body["transformers"] == transformers.__version__
    assert body["python"] == ".".join(map(str, sys.version_info[:3]))
    schema = httpx.get(f"{served.base_url}/openapi.json").json()
    ok = schema["paths"]["/version"]["get"]["responses"]["200"]["content"]["application/json"]
    assert ok["schema"] == {"$ref": "#/components/schemas/VersionInfo"}
    documented = schema["components"]["schemas"]["VersionInfo"]["properties"]
    assert set(documented) == set(body)
    assert all(field.get("description") for field in documented.values())


_ASSET_URL = re.compile(r"""(?:src|href)=["']([^"']+)["']""")
_CONTENT_TYPES = {".js": "javascript", ".css": "text/css", ".png": "image/png"}


@pytest.mark.parametrize(("page", "needs"), [("/docs", [".js", ".css"]), ("/redoc", [".js"])])
def test_docs_pages_load_only_local_assets(served: Served, page: str, needs: list[str]) -> None:
    """The pages work offline: every script, style and icon comes from this server."""
    html = httpx.get(f"{served.base_url}{page}").text
    assert "'/openapi.json'" in html or '"/openapi.json"' in html
    assert re.findall(r"https?://", html) == [], html  # no CDN, no web fonts
    urls = _ASSET_URL.findall(html)
    assert {Path(url).suffix for url in urls} >= set(needs)
    for url in urls:
        assert url.startswith("/") and not url.startswith("//"), url
        asset = httpx.get(f"{served.base_url}{url}")
        assert asset.status_code == 200, url
        assert _CONTENT_TYPES[Path(url).suffix] in asset.headers["content-type"]
        assert len(asset.content) > 1000


def _http_requests(served: Served) -> dict[tuple[str, str], float]:
    text = httpx.get(f"{served.base_url}/metrics").text
    counts: dict[tuple[str, str], float] = {}
    for family in text_string_to_metric_families(text):
        if family.name == "autoglm:http_requests":
            for sample in family.samples:
                key = (sample.labels["route"], sample.labels["status"])
                counts[key] = counts.get(key, 0) + sample.value
    return counts


def test_every_served_path_has_its_own_route_label(served: Served) -> None:
    paths = {
        "/metrics": "/metrics",
        "/docs": "/docs",
        "/redoc": "/redoc",
        "/docs/oauth2-redirect": "/docs/oauth2-redirect",
        "/openapi.json": "/openapi.json",
        "/docs/assets/swagger-ui.css": "/docs/assets",
        "/version": "/version",
    }
    before = _http_requests(served)
    for path in paths:
        assert httpx.get(f"{served.base_url}{path}").status_code == 200, path
    assert httpx.get(f"{served.base_url}/no/such/path").status_code == 404
    after = _http_requests(served)
    for route in paths.values():
        assert after.get((route, "200"), 0) > before.get((route, "200"), 0), route
    assert after[("unmatched", "404")] == before.get(("unmatched", "404"), 0) + 1
    assert ("unmatched", "200") not in after


@pytest.mark.integration
def test_taken_port_fails_before_the_model_loads(tiny_checkpoint: Path) -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        start = time.monotonic()
        proc = subprocess.run(
            [sys.executable, "-X", "importtime", "-m", "auto_glm.serving"]
            + ["--model", str(tiny_checkpoint), "--device", "cpu", "--dtype", "float32"]
            + ["--host", "127.0.0.1", "--port", str(port), "--kv-cache-memory", "16MiB"],
            env=ENV,
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=120,
        )
        elapsed = time.monotonic() - start
    message = [line for line in proc.stderr.splitlines() if line.startswith("autoglm serve:")]
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert len(message) == 1, proc.stderr[-2000:]
    assert f"127.0.0.1:{port}" in message[0]
    assert "(from --port)" in message[0] and "choose a free port with --port" in message[0]
    imported = {line.rsplit("|", 1)[-1].strip() for line in proc.stderr.splitlines()}
    assert "torch" not in imported  # the model (which needs torch) was never loaded
    assert elapsed < 15, f"took {elapsed:.1f} s"


def test_port_message_names_where_the_port_came_from(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from auto_glm.serving.cli import main

    monkeypatch.delenv("AUTOGLM_HOST", raising=False)
    monkeypatch.delenv("AUTOGLM_CONFIG", raising=False)
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        monkeypatch.setenv("AUTOGLM_PORT", str(port))
        assert main(["--model", "/no/such/model"]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"autoglm serve: cannot listen on 127.0.0.1:{port}:")
    assert f"port {port} (from $AUTOGLM_PORT) is taken" in err


@pytest.mark.integration
@pytest.mark.slow
def test_startup_line_names_model_precision_cache_and_limits(tiny_checkpoint: Path) -> None:
    port = free_port()
    flags = [
        "--model",
        str(tiny_checkpoint),
        "--served-model-name",
        "tiny",
        "--device",
        "cpu",
        "--dtype",
        "float32",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--kv-cache-memory",
        "16MiB",
        "--max-model-len",
        "512",
        "--max-num-seqs",
        "8",
        "--max-num-batched-tokens",
        "256",
        "--max-queued-requests",
        "32",
        "--request-timeout",
        "90",
        "--max-request-bytes",
        "1MiB",
        "--max-prompt-chars",
        "5000",
        "--log-format",
        "text",
        "--log-level",
        "info",
    ]
    proc = subprocess.Popen(
        [sys.executable, "-m", "auto_glm.serving", *flags],
        env=ENV,
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,  # read to the end below, so the pipe never fills
        text=True,
    )
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True)
    reader.start()
    try:
        wait_ready(f"http://127.0.0.1:{port}", timeout=120, alive=lambda: proc.poll() is None)
        deadline = time.monotonic() + 10
        while not any(" server started " in line for line in lines):
            assert time.monotonic() < deadline, "no start-up line:\n" + "".join(lines)
            time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=60)
    started = [line for line in lines if " server started " in line]
    assert len(started) == 1, "".join(lines)
    assert " INFO auto_glm.serving " in started[0]
    fields = dict(re.findall(r"(\w+)=(\S+)", started[0]))
    assert fields["url"] == f"http://127.0.0.1:{port}"
    assert fields["model"] == "tiny"
    assert fields["model_path"] == str(tiny_checkpoint)
    assert (fields["dtype"], fields["compute_dtype"], fields["device"]) == (
        "float32",
        "float32",
        "cpu",
    )
    blocks, tokens, size = (
        int(fields[k]) for k in ("kv_cache_blocks", "kv_cache_tokens", "kv_cache_bytes")
    )
    assert tokens == blocks * 16 and 0 < size <= 16 << 20 and size > (16 << 20) - size // blocks
    assert fields["max_model_len"] == "512"
    assert fields["max_num_seqs"] == "8"
    assert fields["max_num_batched_tokens"] == "256"
    assert fields["max_queued_requests"] == "32"
    assert float(fields["request_timeout"]) == 90
    assert int(fields["max_request_bytes"]) == 1 << 20
    assert int(fields["max_prompt_chars"]) == 5000
