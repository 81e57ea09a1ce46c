"""The scripts of a lent GPU session (issue 13), run here without a GPU: ``gpu_check.sh``'s
syntax and how it records its steps, which prebuilt FlashInfer kernels it installs, and
``gpu_wheels.sh``'s syntax. A session gets one or two calls, so the harness must go on past a
step that fails or runs out of time, and bring back what each step did."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
import zipfile
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from tests.test_bench_nano import TINY_QWEN3

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


def _gpu_check(
    tmp_path: Path, timeout: float = 180, **settings: str
) -> tuple[subprocess.CompletedProcess, list[dict], str]:
    """gpu_check.sh run with ``settings`` (STEPS, PYTHON, limits, folders) and no wheels
    unless they say: how it ended, its status.json's steps and its check.log."""
    results, none = tmp_path / "results", tmp_path / "no-wheels"
    env = {
        **os.environ,
        "PYTHON": sys.executable,
        "WHEELS": str(none),
        "FLASHINFER_WHEELS": str(none),
        **settings,
    }
    done = subprocess.run(
        ["bash", str(SCRIPTS / "gpu_check.sh"), str(results)],
        capture_output=True, text=True, env=env, timeout=timeout,
    )  # fmt: skip
    status = json.loads((results / "status.json").read_text())
    return done, status["steps"], (results / "check.log").read_text()


@pytest.mark.skipif(torch.cuda.device_count() > 0, reason="the steps would pass on a GPU")
def test_gpu_check_records_every_step_and_goes_on_past_failures(tmp_path: Path) -> None:
    """Without a GPU: the `gpu` step fails, FlashInfer's load (in the background) refuses,
    and the decode kernel's sweep is stopped by a 0.1 s limit. Each is recorded with its
    exit code, the next steps still run, the background step's output is logged when it is
    joined, the steps not asked for are recorded as skipped, and the exit code says that
    something failed."""
    done, recorded, log = _gpu_check(
        tmp_path, STEPS="gpu flashinfer decode-kernel", DECODE_KERNEL_LIMIT="0.1"
    )
    assert done.returncode == 1, done.stdout[-3000:] + done.stderr[-3000:]
    steps = {s["step"]: s for s in recorded}
    assert sorted(steps) == sorted(ORDER) and len(recorded) == len(ORDER)
    assert steps["gpu"]["status"] == "failed" and steps["gpu"]["exit"] != 0
    assert (steps["decode-kernel"]["status"], steps["decode-kernel"]["exit"]) == ("timeout", 124)
    assert (steps["flashinfer"]["status"], steps["flashinfer"]["exit"]) == ("failed", 1)
    for name in set(ORDER) - {"gpu", "flashinfer", "decode-kernel"}:
        assert (steps[name]["status"], steps[name]["exit"]) == ("skipped", 0), name
    assert "torch sees: no GPU" in log
    background = log.index("== [flashinfer] start in the background")
    sweep, stopped = log.index("== [decode-kernel] start"), log.index("== [decode-kernel] timeout")
    joined = log.index("== [flashinfer] output (it ran in the background)")
    assert background < sweep < stopped < joined
    assert log.index("load needs a CUDA GPU", joined) < log.index("== [flashinfer] failed")
    summary = done.stdout[done.stdout.index("== gpu_check:") :]
    assert "decode-kernel    timeout  exit 124" in summary


def _pure_wheel(folder: Path, name: str) -> Path:
    """A minimal pure-Python wheel: ``name`` with ``VALUE = 1``."""
    wheel = folder / f"{name}-1.0-py3-none-any.whl"
    info = f"{name}-1.0.dist-info"
    files = {
        f"{name}/__init__.py": "VALUE = 1\n",
        f"{info}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n",
        f"{info}/WHEEL": "Wheel-Version: 1.0\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    files[f"{info}/RECORD"] = "".join(f"{path},,\n" for path in [*files, f"{info}/RECORD"])
    with zipfile.ZipFile(wheel, "w") as archive:
        for path, text in files.items():
            archive.writestr(path, text)
    return wheel


def test_a_wheel_the_machine_refuses_leaves_the_others_installed(tmp_path: Path) -> None:
    """pip refuses a whole install for one wheel whose platform the machine does not take;
    the wheels step then installs them one by one, so the others still go in, and fails."""
    wheels, site = tmp_path / "wheels", tmp_path / "site"
    wheels.mkdir()
    _pure_wheel(wheels, "tidy")
    (wheels / "foreign-1.0-cp312-cp312-win_amd64.whl").write_bytes(b"")
    done, recorded, log = _gpu_check(tmp_path, STEPS="wheels", WHEELS=str(wheels), SITE=str(site))
    assert done.returncode == 1, done.stdout[-3000:] + done.stderr[-3000:]
    steps = {s["step"]: s for s in recorded}
    assert (steps["wheels"]["status"], steps["wheels"]["exit"]) == ("failed", 1)
    assert (site / "tidy" / "__init__.py").read_text() == "VALUE = 1\n"
    assert not any(site.glob("foreign*"))
    assert (
        "installing the wheels of" in log and "foreign-1.0-cp312-cp312-win_amd64.whl refused" in log
    )


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


# ---- what the GPU machine's image can import ------------------------------------------
@pytest.fixture
def image_python(tmp_path: Path) -> Path:
    """An interpreter, for gpu_check.sh's PYTHON, that runs this Python with only the GPU
    machine's image's packages and the carried wheels importable (tests/device_image.py)."""
    python = tmp_path / "image-python"
    python.write_text(f'#!/bin/sh\nexec "{sys.executable}" "{REPO}/tests/device_image.py" "$@"\n')
    python.chmod(0o755)
    return python


def _run_in_image(image_python: Path, *args: str, timeout: float) -> str:
    done = subprocess.run(
        [str(image_python), *args], capture_output=True, text=True, cwd=REPO, timeout=timeout
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout


def test_the_image_hides_what_it_lacks_and_keeps_what_it_holds_or_is_carried(
    image_python: Path, tmp_path: Path
) -> None:
    """fastapi and jsonschema (installed here, not on the image) are neither importable nor
    seen by importlib.metadata; torch (the image's), transformers and llguidance (carried:
    benchmarks/gpu_wheels.txt) are; a package the image holds brings what it needs, even
    where its version here needs more than the image's (huggingface_hub loads whole)."""
    probe = tmp_path / "probe.py"
    probe.write_text(
        "import importlib.metadata, importlib.util, json\n"
        "import huggingface_hub.file_download\n"
        "names = ['fastapi', 'jsonschema', 'torch', 'transformers', 'llguidance']\n"
        "dists = {d.metadata['Name'].lower() for d in importlib.metadata.distributions()}\n"
        "print(json.dumps({n: [importlib.util.find_spec(n) is not None, n in dists]"
        " for n in names}))\n"
    )
    seen = json.loads(_run_in_image(image_python, str(probe), timeout=60))
    assert seen == {
        "fastapi": [False, False],
        "jsonschema": [False, False],
        "torch": [True, True],
        "transformers": [True, True],
        "llguidance": [True, True],
    }
    hidden = tmp_path / "hidden.py"
    hidden.write_text("import fastapi\n")
    done = subprocess.run([str(image_python), str(hidden)], capture_output=True, text=True)
    assert done.returncode == 1 and "No module named 'fastapi'" in done.stderr


@pytest.mark.slow
def test_gpu_checks_test_steps_pass_with_only_what_the_image_holds(
    image_python: Path, tmp_path: Path
) -> None:
    """gpu_check.sh's two test steps, run here by the script itself, as the GPU machine would
    import: every test file loads, and the tests that need no GPU pass (the GPU-only ones
    skip here). A test module, or a workload of its, that needs a package the image lacks
    fails here, not in a lent GPU session (rare, and minutes long)."""
    done, recorded, log = _gpu_check(
        tmp_path, timeout=600, STEPS="cuda-tests triton-tests", PYTHON=str(image_python)
    )
    assert done.returncode == 0, log[-5000:]
    steps = {s["step"]: s["status"] for s in recorded}
    assert steps["cuda-tests"] == steps["triton-tests"] == "ok"
    passed = [int(n) for n in re.findall(r"^(\d+) passed", log, re.MULTILINE)]
    assert len(passed) == 2 and min(passed) > 0, log[-3000:]
    assert "slowest 15 durations" in log  # what a GPU session's limit must leave room for


@pytest.mark.slow
def test_gpu_checks_benchmarks_run_with_only_what_the_image_holds(
    image_python: Path, make_checkpoint: Callable[..., Path], tmp_path: Path
) -> None:
    """The GPU session's scripts, each at a tiny scale on the CPU: the nano benchmark (with
    the Triton backend and both transformers contenders), the bf16 agreement, the decode
    kernel's sweep and the profile."""
    model = make_checkpoint("Qwen3ForCausalLM", dtype=torch.bfloat16, **TINY_QWEN3)
    report = tmp_path / "nano.json"
    _run_in_image(
        image_python, "benchmarks/bench_engine.py", *(
            f"--workload nano --device cpu --model-dir {model} --requests 4 --prompt-lens 8 16 "
            "--output-lens 4 8 --max-num-seqs 4 --max-num-batched-tokens 64 --kv-cache-mib 4 "
            "--decode-batches 1 3 --decode-steps 3 --hf-requests 2 --attention-backend triton "
            f"--json {report}"
        ).split(), timeout=300,
    )  # fmt: skip
    assert json.loads(report.read_text())["engine"]["attention_backend"] == "triton"
    table = _run_in_image(
        image_python, "benchmarks/bf16_agreement.py", "--device", "cpu", "--prompts", "2",
        "--tokens", "4", "--no-nano", timeout=300,
    )  # fmt: skip
    assert table.count("ForCausalLM |") == 5
    sweep = tmp_path / "sweep.json"
    _run_in_image(
        image_python, "benchmarks/bench_decode_kernel.py", "--batches", "2", "--context", "32",
        "--iters", "1", "--quick", "--json", str(sweep), timeout=300,
    )  # fmt: skip
    assert len(json.loads(sweep.read_text())["rows"]) >= 2
    traces = tmp_path / "traces"
    _run_in_image(
        image_python, "benchmarks/gpu_profile.py", "--device", "cpu", "--model-dir", str(model),
        "--batch", "2", "--steps", "2", "--prompt-len", "8", "--prefill-requests", "1",
        "--out", str(traces), timeout=300,
    )  # fmt: skip
    assert sorted(p.name for p in traces.iterdir()) == ["decode-eager.json.gz", "prefill.json.gz"]
