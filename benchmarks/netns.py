"""Run a Ray benchmark inside a loopback-only network namespace.

Ray binds some ports to every interface; a benchmark re-executes itself under
``unshare --net`` (with only ``lo`` up) unless :data:`NETNS_ENV` says it already runs there.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

__all__ = ["NETNS_ENV", "in_namespace", "reexec_in_namespace"]

NETNS_ENV = "AUTOGLM_BENCH_NETNS"


def in_namespace() -> bool:
    return os.environ.get(NETNS_ENV) == "1"


def reexec_in_namespace(script: str, argv: list[str]) -> int:
    """Run ``script`` with ``argv`` again in a fresh network namespace; its exit status."""
    if not (shutil.which("unshare") and shutil.which("ip")):
        print("needs unshare (util-linux) and ip (iproute2), and root", file=sys.stderr)
        return 2
    command = [sys.executable, str(Path(script).resolve()), *argv]
    inner = "ip link set lo up && exec " + shlex.join(command)
    env = {**os.environ, NETNS_ENV: "1", "RAY_USAGE_STATS_ENABLED": "0"}
    return subprocess.run(["unshare", "--net", "sh", "-c", inner], env=env).returncode
