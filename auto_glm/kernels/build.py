"""Build (once per machine) and load the C++ kernels in ``csrc/``.

A build is crash-safe and bounded: a child process compiles into a private directory and
renames it into place only once it holds the finished library, so a build killed halfway
leaves nothing that a later start waits on (torch's own ``cpp_extension.load`` leaves a lock
file that makes every later load wait forever). A build that outlives its time limit is
stopped, and the engine falls back to plain torch. A finished build is loaded directly.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import os
import platform
import secrets
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch

__all__ = ["BUILD_TIMEOUT_S", "DECODE_HEAD_DIMS", "KERNEL_DTYPES", "cpu_kernels"]

log = logging.getLogger("auto_glm.kernels")

# head dims that paged_decode_attention is compiled for (its dispatch switch, in csrc/)
DECODE_HEAD_DIMS = (16, 32, 64, 80, 96, 128, 256)
# the dtypes every kernel is compiled for; a model computing in another one uses plain torch
KERNEL_DTYPES = (torch.float32, torch.bfloat16)
# how long a build may take (about 15 s on an idle machine) before it is stopped
BUILD_TIMEOUT_S = 300.0
# a private build directory untouched this long belongs to a build that was killed
_STALE_AFTER_S = 3600.0

_CSRC = Path(__file__).parent / "csrc"
_SOURCES = sorted(_CSRC.glob("*.cpp"))
# -march=native ties a build to this CPU; the CPU's name goes into the build's name (below)
# so a home directory shared between different machines never loads a foreign build.
# -ffast-math lets the compiler vectorise the dot products, sums and exp, but its
# -ffinite-math-only lets it assume there is no NaN or inf: it then turned silu(-100) into
# NaN, a row holding one inf into all NaN, and dropped the NaN test of c10's float-to-bfloat16
# rounding. -fno-finite-math-only keeps IEEE NaN and inf, so the kernels give non-finite
# values exactly where torch does (csrc/common.h keeps exp vectorised).
# -fopenmp makes at::parallel_for use torch's own OpenMP thread pool (the same libgomp).
_CFLAGS = ["-O3", "-march=native", "-ffast-math", "-fno-finite-math-only", "-fopenmp"]
_LDFLAGS = ["-fopenmp"]


def _cpu_name() -> str:
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.processor() or platform.machine()
    wanted = ("model name", "flags")
    return "\n".join(dict.fromkeys(ln for ln in lines if ln.startswith(wanted)))


def _build_name() -> str:
    """Names one build: the CPU, torch (a build links against its ABI), sources and flags."""
    digest = hashlib.sha256(_cpu_name().encode())
    digest.update(torch.__version__.encode())
    for source in sorted([*_CSRC.glob("*.cpp"), *_CSRC.glob("*.h")]):
        digest.update(source.name.encode())
        digest.update(source.read_bytes())
    digest.update(" ".join(_CFLAGS + _LDFLAGS).encode())
    return f"autoglm_cpu_{digest.hexdigest()[:12]}"


def _remove_stale(root: Path) -> None:
    """Remove private directories of builds that were killed (by age: a live one is young)."""
    for path in [*root.glob("autoglm_cpu_*.tmp-*"), *root.glob("autoglm_cpu_*.stale-*")]:
        with contextlib.suppress(OSError):  # another process may be removing it too
            if time.time() - path.stat().st_mtime > _STALE_AFTER_S:
                shutil.rmtree(path)


def _stop(child: subprocess.Popen) -> None:
    """Kill the build child with its compiler processes (its own process group)."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(child.pid, signal.SIGKILL)
    child.wait()


def _build(name: str, final: Path, timeout_s: float | None) -> str | None:
    """Compile into a private directory beside ``final`` and rename it into place, in a
    child process; None once built, else what went wrong and what to do about it."""
    log.info("compiling the native CPU kernels (once per machine, ~15 s)")
    _remove_stale(final.parent)
    private = final.with_name(f"{name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")
    private.mkdir()
    job = {
        "name": name,
        "sources": [str(s) for s in _SOURCES],
        "cflags": _CFLAGS,
        "ldflags": _LDFLAGS,
        "build_dir": str(private),
        "final_dir": str(final),
    }
    command = [sys.executable, "-m", "auto_glm.kernels.build_job", json.dumps(job)]
    child = subprocess.Popen(
        command,
        cwd=Path(__file__).parents[2],  # imports the same auto_glm as this process
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # one process group with its compilers, killed as one
    )
    try:
        _, errors = child.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        _stop(child)
        return (
            f"did not build within their time limit of {timeout_s:g} s (the build was "
            "stopped); the engine falls back to slower plain torch. On a slow or busy "
            "machine, build them once without a limit: python -c 'from auto_glm.kernels "
            "import cpu_kernels; cpu_kernels(timeout_s=None)'"
        )
    except BaseException:  # interrupted: take the compilers down too
        _stop(child)
        raise
    finally:
        shutil.rmtree(private, ignore_errors=True)  # already gone once renamed into place
    if child.returncode:
        lines = [ln for ln in errors.splitlines() if ln.strip()]
        reason = lines[-1].strip() if lines else f"exit status {child.returncode}"
        return (
            f"could not be built ({reason}); the engine falls back to slower plain torch. "
            "Install a C++ compiler and ninja (apt install g++; pip install ninja) to get them."
        )
    return None


@functools.cache
def cpu_kernels(timeout_s: float | None = BUILD_TIMEOUT_S) -> SimpleNamespace | None:
    """The compiled CPU kernels (float32 and bfloat16), or None, with one warning, when they
    cannot be built within ``timeout_s`` seconds (None: no limit).

    The first call on a machine compiles for about fifteen seconds; later calls, in any
    process, load the finished build from torch's extension directory
    (``TORCH_EXTENSIONS_DIR``, default ``~/.cache/torch_extensions``).
    """
    from torch.utils import cpp_extension

    name = _build_name()
    try:
        final = Path(cpp_extension._get_build_directory(name, verbose=False))
        library = final / f"{name}.so"
        problem = None if library.exists() else _build(name, final, timeout_s)
    except OSError as exc:  # the extension directory cannot be created or written
        problem = (
            f"could not be built ({exc}); the engine falls back to slower plain torch. "
            "Set TORCH_EXTENSIONS_DIR to a writable directory to get them."
        )
    if problem is not None:
        log.warning("the native CPU kernels %s", problem)
        return None
    # a build loaded already (from another TORCH_EXTENSIONS_DIR) is kept: a second copy of
    # the ops would abort the process as it registers them
    if not hasattr(torch.ops.autoglm, "silu_and_mul"):
        try:
            torch.ops.load_library(str(library))
        except OSError as exc:  # a damaged file
            log.warning(
                "the native CPU kernels in %s could not be loaded (%s); the engine falls back "
                "to slower plain torch. Delete that directory to have them rebuilt.",
                final,
                exc,
            )
            return None
    ops = torch.ops.autoglm
    return SimpleNamespace(
        paged_decode_attention=ops.paged_decode_attention,
        rms_norm=ops.rms_norm,
        add_rms_norm=ops.add_rms_norm,
        silu_and_mul=ops.silu_and_mul,
        quantize_rows_int8=ops.quantize_rows_int8,
        scale_rows=ops.scale_rows,
        amx_available=ops.amx_available,
        pack_int8_amx=ops.pack_int8_amx,
        w8a8_linear_amx=ops.w8a8_linear_amx,
        pack_int8_amx_bf16=ops.pack_int8_amx_bf16,
        int8_linear_amx=ops.int8_linear_amx,
        avx2_linear_available=ops.avx2_linear_available,
        pack_linear_avx2=ops.pack_linear_avx2,
        linear_avx2=ops.linear_avx2,
    )
