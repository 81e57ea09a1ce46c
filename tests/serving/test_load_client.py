"""The benchmark load client against a live server: every request completes and is measured."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.serving.conftest import Served

pytestmark = pytest.mark.integration
SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "load_client.py"


@pytest.mark.parametrize("endpoint", ["completions", "chat"])
def test_load_client_reports_latencies_and_loses_nothing(
    served: Served, tmp_path: Path, endpoint: str
) -> None:
    out = tmp_path / "load.json"
    result = subprocess.run(
        [
            sys.executable,
            str(SCRIPT),
            "--url",
            served.base_url,
            "--endpoint",
            endpoint,
            "--concurrency",
            "12",
            "--max-tokens",
            "8",
            "--json",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "TTFT" in result.stdout and "ITL" in result.stdout and "E2E" in result.stdout
    report = json.loads(out.read_text())["result"]
    assert report["completed"] == 12 and report["errors"] == {}
    assert report["output_tokens"] == 12 * 8
    assert report["ttft_ms"]["p50"] <= report["e2e_ms"]["p50"]
    served.wait_idle()
