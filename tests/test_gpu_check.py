"""The scripts of a lent GPU session (issue 13), run here without a GPU: ``gpu_check.sh``'s
syntax and how it records its steps, which prebuilt FlashInfer kernels it installs, and
``gpu_wheels.sh``'s syntax. A session gets one or two calls, so the harness must go on past a
step that fails or runs out of time, and bring back what each step did."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
SCRIPTS = REPO / "benchmarks"
ORDER = [
    "wheels", "gpu", "decode-kernel", "nano", "flashinfer", "flashinfer-nano", "agreement",
    "cuda-tests", "triton-tests", "profile",
]  # fmt: skip


@pytest.mark.parametrize("script", ["gpu_check.sh", "gpu_wheels.sh"])
def test_the_gpu_session_scripts_parse(script: str) -> None:
    done = subprocess.run(["bash", "-n", str(SCRIPTS / script)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


@pytest.mark.skipif(torch.cuda.device_count() > 0, reason="the steps would pass on a GPU")
def test_gpu_check_records_every_step_and_goes_on_past_failures(tmp_path: Path) -> None:
    """Without a GPU: the `gpu` step fails, FlashInfer's load (in the background) refuses,
    and the decode kernel's sweep is stopped by a 0.1 s limit. Each is recorded with its
    exit code, the next steps still run, the background step's output is logged when it is
    joined, the steps not asked for are recorded as skipped, and the exit code says that
    something failed."""
    results, none = tmp_path / "results", tmp_path / "no-wheels"
    env = {
        **os.environ,
        "STEPS": "gpu flashinfer decode-kernel",
        "PYTHON": sys.executable,
        "DECODE_KERNEL_LIMIT": "0.1",
        "WHEELS": str(none),
        "FLASHINFER_WHEELS": str(none),
    }
    done = subprocess.run(
        ["bash", str(SCRIPTS / "gpu_check.sh"), str(results)],
        capture_output=True, text=True, env=env, timeout=180,
    )  # fmt: skip
    assert done.returncode == 1, done.stdout[-3000:] + done.stderr[-3000:]
    status = json.loads((results / "status.json").read_text())
    steps = {s["step"]: s for s in status["steps"]}
    assert sorted(steps) == sorted(ORDER) and len(status["steps"]) == len(ORDER)
    assert steps["gpu"]["status"] == "failed" and steps["gpu"]["exit"] != 0
    assert (steps["decode-kernel"]["status"], steps["decode-kernel"]["exit"]) == ("timeout", 124)
    assert (steps["flashinfer"]["status"], steps["flashinfer"]["exit"]) == ("failed", 1)
    for name in set(ORDER) - {"gpu", "flashinfer", "decode-kernel"}:
        assert (steps[name]["status"], steps[name]["exit"]) == ("skipped", 0), name
    log = (results / "check.log").read_text()
    assert "torch sees: no GPU" in log
    background = log.index("== [flashinfer] start in the background")
    sweep, stopped = log.index("== [decode-kernel] start"), log.index("== [decode-kernel] timeout")
    joined = log.index("== [flashinfer] output (it ran in the background)")
    assert background < sweep < stopped < joined
    assert log.index("load needs a CUDA GPU", joined) < log.index("== [flashinfer] failed")
    summary = done.stdout[done.stdout.index("== gpu_check:") :]
    assert "decode-kernel    timeout  exit 124" in summary


def test_prebuilt_flashinfer_kernels_are_installed_only_for_the_version_that_built_them(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """The GPU session copies the kernels built here into FlashInfer's folder of prebuilt
    ones; FlashInfer's kernel names hold no version, so a folder built by another version
    is left out (every kernel then compiles there) rather than loaded."""
    spec = importlib.util.spec_from_file_location(
        "flashinfer_prebuild", SCRIPTS / "flashinfer_prebuild.py"
    )
    prebuild = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(prebuild)
    built = tmp_path / "built"
    (built / "decode").mkdir(parents=True)
    (built / "decode" / "decode.so").write_bytes(b"kernel")
    (built / prebuild.VERSION_FILE).write_text("0.6.18\n")

    package = tmp_path / "package-aot"
    prebuild._install(built, package, "0.7.0")
    assert not package.exists()
    assert "built by flashinfer 0.6.18, not 0.7.0: every kernel compiles" in capsys.readouterr().out
    prebuild._install(built, package, "0.6.18")
    assert (package / "decode" / "decode.so").read_bytes() == b"kernel"
    (built / prebuild.VERSION_FILE).unlink()  # not a folder `build` wrote
    prebuild._install(built, tmp_path / "other", "0.6.18")
    assert not (tmp_path / "other").exists()
