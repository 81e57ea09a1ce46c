"""Build (once per machine) and load the C++ kernels in ``csrc/``."""

from __future__ import annotations

import functools
import hashlib
import logging
import platform
from pathlib import Path
from types import SimpleNamespace

import torch

__all__ = ["DECODE_HEAD_DIMS", "KERNEL_DTYPES", "cpu_kernels"]

log = logging.getLogger("auto_glm.kernels")

# head dims that paged_decode_attention is compiled for (its dispatch switch, in csrc/)
DECODE_HEAD_DIMS = (16, 32, 64, 80, 96, 128, 256)
# the dtypes every kernel is compiled for; a model computing in another one uses plain torch
KERNEL_DTYPES = (torch.float32, torch.bfloat16)

_SOURCES = sorted((Path(__file__).parent / "csrc").glob("*.cpp"))
# -march=native ties a build to this CPU; the CPU's name goes into the build's name (below)
# so a home directory shared between different machines never loads a foreign build.
# -ffast-math lets the compiler vectorise the dot products and exp; the kernels only see
# finite scores (no masking), which is what it assumes.
# -fopenmp makes at::parallel_for use torch's own OpenMP thread pool (the same libgomp).
_CFLAGS = ["-O3", "-march=native", "-ffast-math", "-fopenmp"]


def _cpu_name() -> str:
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.processor() or platform.machine()
    wanted = ("model name", "flags")
    return "\n".join(dict.fromkeys(ln for ln in lines if ln.startswith(wanted)))


def _build_name() -> str:
    digest = hashlib.sha256(_cpu_name().encode())
    for source in _SOURCES:
        digest.update(source.read_bytes())
    digest.update(" ".join(_CFLAGS).encode())
    return f"autoglm_cpu_{digest.hexdigest()[:12]}"


@functools.cache
def cpu_kernels() -> SimpleNamespace | None:
    """The compiled CPU kernels (float32 and bfloat16), or None, with one warning, when they
    cannot be built.

    The first call on a machine compiles for about ten seconds; later calls, in any process,
    load the cached build from torch's extension directory (``TORCH_EXTENSIONS_DIR``,
    default ``~/.cache/torch_extensions``).
    """
    from torch.utils import cpp_extension

    log.info("loading the native CPU kernels (compiled once per machine, ~15 s the first time)")
    try:
        cpp_extension.load(
            _build_name(),
            sources=[str(s) for s in _SOURCES],
            extra_cflags=_CFLAGS,
            extra_ldflags=["-fopenmp"],
            is_python_module=False,
            verbose=False,
        )
    except Exception as exc:  # a missing compiler or ninja surfaces as several error types
        log.warning(
            "the native CPU kernels could not be built (%s); the engine falls back to "
            "slower plain torch. Install a C++ compiler and ninja "
            "(apt install g++; pip install ninja) to get them.",
            str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__,
        )
        return None
    ops = torch.ops.autoglm
    return SimpleNamespace(
        paged_decode_attention=ops.paged_decode_attention,
        rms_norm=ops.rms_norm,
        add_rms_norm=ops.add_rms_norm,
        silu_and_mul=ops.silu_and_mul,
    )
