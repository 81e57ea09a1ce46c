"""The machine line every benchmark prints first: CPU model, cores, and the flags that
decide which kernels run (benchmarks are only comparable on the same flags); on a GPU, the
GPU's name, memory and compute capability as well."""

from __future__ import annotations

import os
import platform
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch is imported only where a GPU is described
    import torch

__all__ = ["DEFAULT_FLAGS", "cpu_line", "device_line"]

DEFAULT_FLAGS = ("avx512f", "avx512_bf16", "amx_bf16", "amx_int8", "amx_tile", "avx512_vnni")


def cpu_line(flags: Sequence[str] = DEFAULT_FLAGS) -> str:
    """``"<model name>; N cores; flags: present (absent: missing)"`` from /proc/cpuinfo."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.processor() or platform.machine()
    name = next((ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("model name")), "?")
    found = next((ln.split(":", 1)[1].split() for ln in lines if ln.startswith("flags")), [])
    present = [flag for flag in flags if flag in found]
    absent = [flag for flag in flags if flag not in found]
    return (
        f"{name}; {os.cpu_count()} cores; flags: {', '.join(present) or 'none'}"
        f" (absent: {', '.join(absent) or 'none'})"
    )


def device_line(device: torch.device) -> str:
    """:func:`cpu_line`; on a GPU preceded by ``"<name>, N GiB, compute capability X.Y,
    CUDA V; host: "``."""
    if device.type != "cuda":
        return cpu_line()
    import torch

    props = torch.cuda.get_device_properties(device)
    return (
        f"{props.name}, {props.total_memory / 2**30:.0f} GiB, compute capability "
        f"{props.major}.{props.minor}, CUDA {torch.version.cuda}; host: {cpu_line()}"
    )
