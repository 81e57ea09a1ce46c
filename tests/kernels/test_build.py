"""Building the kernels is crash-safe and bounded: a build killed halfway, or a lock file it
left, never makes a later start wait, and a build over its time limit falls back to torch.

Builds and loads run in subprocesses with a fresh ``TORCH_EXTENSIONS_DIR``: one process can
load the kernels' ops only once.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from torch.utils import cpp_extension

from auto_glm.kernels import cpu_kernels
from auto_glm.kernels.build import _build_name
from auto_glm.kernels.build_job import install

LOAD = "from auto_glm.kernels import cpu_kernels; assert cpu_kernels() is not None"
needs_compiler = pytest.mark.skipif(
    not (shutil.which("c++") or shutil.which("g++")), reason="no C++ compiler"
)


def _final_dir(extensions: Path | None = None) -> Path:
    """Where torch's cpp_extension.load builds, and where its lock file goes (created)."""
    with pytest.MonkeyPatch.context() as patch:
        if extensions is not None:
            patch.setenv("TORCH_EXTENSIONS_DIR", str(extensions))
        return Path(cpp_extension._get_build_directory(_build_name(), verbose=False))


def _copy_finished_build(extensions: Path) -> Path:
    """The session's build (the ``kernels`` fixture's), copied under ``extensions``."""
    library = f"{_build_name()}.so"
    final = _final_dir(extensions)
    shutil.copy(_final_dir() / library, final / library)
    return final


def _load_in_subprocess(extensions: Path, timeout: float) -> None:
    env = {**os.environ, "TORCH_EXTENSIONS_DIR": str(extensions)}
    try:
        done = subprocess.run(
            [sys.executable, "-c", LOAD], env=env, capture_output=True, text=True, timeout=timeout
        )
    except subprocess.TimeoutExpired:
        pytest.fail(f"loading the kernels did not finish within {timeout} s (a hang)")
    assert done.returncode == 0, done.stderr


def test_a_stale_lock_beside_a_finished_build_does_not_block_loading(kernels, tmp_path):
    final = _copy_finished_build(tmp_path)
    (final / "lock").touch()  # what a process killed during torch's build leaves
    _load_in_subprocess(tmp_path, timeout=90)


def test_a_second_extension_directory_in_one_process_reuses_the_loaded_build(kernels, tmp_path):
    """Loading a second copy of the library would abort the process registering its ops."""
    _copy_finished_build(tmp_path)
    script = (
        f"import os; {LOAD}; from auto_glm.kernels import cpu_kernels; "
        f"os.environ['TORCH_EXTENSIONS_DIR'] = {str(tmp_path)!r}; "
        "assert cpu_kernels.__wrapped__() is not None"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=90
    )
    assert done.returncode == 0, done.stderr[-2000:]


def test_a_build_over_its_time_limit_falls_back_with_a_warning(monkeypatch, tmp_path, caplog):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    with caplog.at_level("WARNING", logger="auto_glm.kernels"):
        assert cpu_kernels.__wrapped__(timeout_s=0.5) is None
    assert "did not build within their time limit of 0.5 s" in caplog.text
    assert "cpu_kernels(timeout_s=None)" in caplog.text
    assert not list(tmp_path.glob("*.tmp-*")), "the stopped build's directory was left behind"


def test_an_unusable_extension_directory_falls_back_with_a_warning(monkeypatch, tmp_path, caplog):
    (tmp_path / "a-file").touch()
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "a-file" / "extensions"))
    with caplog.at_level("WARNING", logger="auto_glm.kernels"):
        assert cpu_kernels.__wrapped__() is None
    assert "Set TORCH_EXTENSIONS_DIR to a writable directory" in caplog.text


@pytest.mark.slow
@pytest.mark.timeout(600)
@needs_compiler
def test_a_build_killed_while_compiling_and_its_stale_lock_do_not_block_the_next(tmp_path):
    """What a build killed halfway leaves (its directory, and the lock a process killed
    during torch's build leaves beside no library) costs the next start one build, no
    wait: one compile covers both, the build is slow."""
    env = {**os.environ, "TORCH_EXTENSIONS_DIR": str(tmp_path)}
    first = subprocess.Popen([sys.executable, "-c", LOAD], env=env, stderr=subprocess.DEVNULL)
    root = psutil.Process(first.pid)
    deadline = time.monotonic() + 120
    while "cc1plus" not in _names(_descendants(root)):
        assert first.poll() is None and time.monotonic() < deadline, "no compiler ever ran"
        time.sleep(0.2)
    for process in [root, *_descendants(root)]:  # as a crash or the OOM killer would
        with contextlib.suppress(psutil.NoSuchProcess):
            process.kill()
    first.wait()
    for leftover in tmp_path.glob("*.tmp-*"):  # as if killed long ago: cleaned up on the way
        os.utime(leftover, (time.time() - 7200, time.time() - 7200))
    final = _final_dir(tmp_path)
    (final / "lock").touch()
    assert not (final / f"{_build_name()}.so").exists()
    _load_in_subprocess(tmp_path, timeout=240)
    assert (final / f"{_build_name()}.so").exists() and not (final / "lock").exists()
    assert [p.name for p in tmp_path.iterdir()] == [final.name], "leftover build directories"


def _descendants(process: psutil.Process) -> list[psutil.Process]:
    try:
        return process.children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def _names(processes: list[psutil.Process]) -> set[str]:
    names = set()
    for process in processes:
        with contextlib.suppress(psutil.NoSuchProcess):  # one that has just exited
            names.add(process.name())
    return names


def _fake_build(path: Path, library: str) -> Path:
    path.mkdir()
    (path / library).write_text("built")
    return path


def test_install_renames_a_finished_build_into_place(tmp_path):
    final = tmp_path / "final"
    install(_fake_build(tmp_path / "a.tmp", "k.so"), final, "k.so")
    assert (final / "k.so").read_text() == "built"
    final.rename(tmp_path / "elsewhere")
    final.mkdir()  # torch creates the directory empty before any build
    install(_fake_build(tmp_path / "b.tmp", "k.so"), final, "k.so")
    assert (final / "k.so").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["elsewhere", "final"]


def test_install_keeps_a_build_that_got_there_first(tmp_path):
    final = _fake_build(tmp_path / "final", "k.so")
    (final / "k.so").write_text("theirs")
    install(_fake_build(tmp_path / "ours.tmp", "k.so"), final, "k.so")
    assert (final / "k.so").read_text() == "theirs"
    assert [p.name for p in tmp_path.iterdir()] == ["final"]


def test_install_replaces_an_unfinished_build_and_its_lock(tmp_path):
    final = tmp_path / "final"
    final.mkdir()
    (final / "lock").touch()
    (final / "fused.o").touch()
    install(_fake_build(tmp_path / "ours.tmp", "k.so"), final, "k.so")
    assert sorted(p.name for p in final.iterdir()) == ["k.so"]
    assert [p.name for p in tmp_path.iterdir()] == ["final"]
