"""Property-based run of schemathesis over the live server's OpenAPI schema: no 5xx.

Bounded for CI: a fixed seed, a few examples per operation and a time budget. Skipped
when schemathesis is not installed (it is in the ``dev`` extras).
"""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest

from tests.serving.conftest import Served

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_schemathesis_finds_no_server_errors(served: Served) -> None:
    pytest.importorskip("schemathesis")
    executable = shutil.which("schemathesis") or shutil.which("st")
    command = [executable] if executable else [sys.executable, "-m", "schemathesis.cli"]
    result = subprocess.run(
        [*command, "run", f"{served.base_url}/openapi.json", "--checks", "not_a_server_error",
         "--phases", "examples,coverage,fuzzing", "--max-examples", "12", "--max-time", "60",
         "--seed", "20240604", "--workers", "2", "--request-timeout", "30", "--no-color"],
        capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]
    served.wait_idle()  # nothing the fuzzer sent was left running
