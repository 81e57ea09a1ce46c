"""Runs the Ray Serve tests (``in_namespace/``) in a new network namespace holding only a
loopback interface: Ray binds some of its ports to every interface, and here that can only
ever mean 127.0.0.1. Needs ``unshare`` and ``ip`` with the right to create a namespace
(root, as in CI); elsewhere the test is skipped with the reason."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.integration]
ROOT = Path(__file__).resolve().parents[2]


def _namespaces_available() -> str | None:
    if not (shutil.which("unshare") and shutil.which("ip")):
        return "needs unshare (util-linux) and ip (iproute2)"
    probe = subprocess.run(["unshare", "--net", "true"], capture_output=True, text=True)
    if probe.returncode != 0:
        return f"cannot create a network namespace here: {probe.stderr.strip()}"
    try:
        import ray  # noqa: F401
    except ImportError:
        return "needs Ray Serve: pip install -e '.[ray]'"
    return None


@pytest.mark.timeout(900)  # the child pytest's own limit, below
def test_ray_serve_scenarios_in_a_loopback_only_namespace(tmp_path: Path) -> None:
    reason = _namespaces_available()
    if reason is not None:
        pytest.skip(reason)
    inner = "ip link set lo up && exec " + " ".join(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "-m",
            "''",  # every test there is marked slow: none is left out
            "--basetemp",
            str(tmp_path / "inner"),
            str(ROOT / "tests" / "cluster" / "in_namespace"),
        ]
    )
    env = {**os.environ, "AUTOGLM_TEST_NETNS": "1", "RAY_USAGE_STATS_ENABLED": "0"}
    done = subprocess.run(
        ["unshare", "--net", "sh", "-c", inner],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    report = (done.stdout + done.stderr)[-6000:]
    assert done.returncode == 0, report
    assert " passed" in done.stdout and "skipped" not in done.stdout.split("\n")[-2], report
