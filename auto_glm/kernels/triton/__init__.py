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
from types import SimpleNamespace
from typing import Any

import torch

from auto_glm.kernels.triton.tiles import DecodeTiles

__all__ = [
    "DecodeTiles",
    "available",
    "fused_kernels",
    "paged_decode_attention",
    "paged_prefill_attention",
    "unavailable_reason",
]

_LAUNCHERS = ("paged_decode_attention", "paged_prefill_attention")


@functools.cache
def unavailable_reason() -> str | None:
    """Why the kernels cannot be imported here (triton missing or broken), or None."""
    try:
        importlib.import_module("triton")
    except ImportError as exc:
        return f"triton is not importable ({exc}); install it with pip install 'open-autoglm[gpu]'"
    return None


def available() -> bool:
    """True when triton imports, so the launchers can be loaded."""
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
