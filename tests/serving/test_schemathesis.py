"""Property-based run of schemathesis over the live server's OpenAPI schema: no 5xx.

Bounded for CI: a fixed seed, 30 fuzzed examples per operation, and a server whose
context is 32 tokens so that no generated request runs long. Skipped when schemathesis is
not installed (it is in the ``dev`` extras).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.serving.conftest import start_service, stop_service

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_schemathesis_finds_no_server_errors(tiny_checkpoint: Path, tmp_path: Path) -> None:
    pytest.importorskip("schemathesis")
    served, thread = start_service(tiny_checkpoint, max_model_len=32)
    executable = shutil.which("schemathesis") or shutil.which("st")
    command = [executable] if executable else [sys.executable, "-m", "schemathesis.cli"]
    result = subprocess.run(
        [
            *command,
            "run",
            f"{served.base_url}/openapi.json",
            "--checks",
            "not_a_server_error",
            "--phases",
            "coverage,fuzzing",
            "--max-examples",
            "30",
            "--seed",
            "20240604",
            "--workers",
            "2",
            "--request-timeout",
            "30",
            "--no-color",
        ],
        capture_output=True,
        text=True,
        timeout=240,
        cwd=tmp_path,
    )  # its cache goes there
    try:
        assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]
        served.wait_idle()  # nothing the fuzzer sent was left running
    finally:
        stop_service(served, thread)
