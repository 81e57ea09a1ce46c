"""Triton GPU kernels: paged decode and varlen prefill attention over the paged KV cache,
and fused RMSNorm, SiLU-and-multiply, rotary embedding and K/V writes (:func:`fused_kernels`).

Importing this package never imports triton: the launchers (``paged_decode_attention``,
``paged_prefill_attention``) load :mod:`auto_glm.kernels.triton.paged_attention` on first
access, so a machine without triton imports the engine cleanly and asks :func:`available`
before choosing the GPU backend. :class:`DecodeTiles` (:mod:`auto_glm.kernels.triton.tiles`)
needs no triton. On CPU tensors the kernels run only in triton's interpreter (``TRITON_INTERPRET=1``
set before the kernels are imported), which the tests use.
"""

from __future__ import annotations

import functools
import importlib
import re
from types import SimpleNamespace
from typing import Any

import torch

from auto_glm.kernels.triton.tiles import DecodeTiles

__all__ = [
    "MIN_TRITON",
    "DecodeTiles",
    "available",
    "fused_kernels",
    "paged_decode_attention",
    "paged_prefill_attention",
    "triton_version_problem",
    "unavailable_reason",
]

_LAUNCHERS = ("paged_decode_attention", "paged_prefill_attention")
# the oldest triton that builds every kernel here: 3.4.0, 3.5.1 and 3.6.0 (torch 2.11's)
# build them for sm_90 and pass their tests in the interpreter; 3.3.1's compiler refuses
# the decode kernels' pointer arithmetic
MIN_TRITON = (3, 4)


def triton_version_problem(version: str) -> str | None:
    """Why triton ``version`` cannot build these kernels, or None."""
    oldest = ".".join(map(str, MIN_TRITON))
    fix = (
        "upgrade torch to 2.8 or newer (its CUDA builds bring a newer triton), or pip install "
        f"'triton>={oldest}'"
    )
    found = re.match(r"(\d+)\.(\d+)", version)
    if found is None:
        return f"triton's version {version!r} cannot be read; these kernels need {oldest}+: {fix}"
    if (int(found[1]), int(found[2])) < MIN_TRITON:
        return (
            f"triton {version} is older than {oldest}, the oldest that builds these kernels; {fix}"
        )
    return None


@functools.cache
def unavailable_reason() -> str | None:
    """Why the kernels cannot be imported here (triton missing, broken or too old), or
    None."""
    try:
        triton = importlib.import_module("triton")
    except ImportError as exc:
        return f"triton is not importable ({exc}); install it with pip install 'open-autoglm[gpu]'"
    return triton_version_problem(getattr(triton, "__version__", "unknown"))


def available() -> bool:
    """True when a recent enough triton imports, so the launchers can be loaded."""
    return unavailable_reason() is None


def fused_kernels(dtype: torch.dtype) -> SimpleNamespace | None:
    """The fused RMSNorm, SiLU-and-multiply, rotary and K/V write launchers for a model
    computing in ``dtype``, or None where triton is missing or the dtype is float32 (see
    :mod:`auto_glm.kernels.triton.fused` and :mod:`auto_glm.kernels.triton.kv_write`)."""
    if not available():
        return None
    fused = importlib.import_module(f"{__name__}.fused")
    if dtype not in fused.FUSED_DTYPES:
        return None
    return SimpleNamespace(
        rms_norm=fused.rms_norm,
        add_rms_norm=fused.add_rms_norm,
        silu_and_mul=fused.silu_and_mul,
        rotary=fused.rotary,
        write_kv=importlib.import_module(f"{__name__}.kv_write").write_kv,
    )


def __getattr__(name: str) -> Any:
    if name not in _LAUNCHERS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    reason = unavailable_reason()
    if reason is not None:
        raise ImportError(f"auto_glm.kernels.triton.{name} needs triton: {reason}")
    module = importlib.import_module(f"{__name__}.paged_attention")
    return getattr(module, name)
