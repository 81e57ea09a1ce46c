"""Choose a model's attention backend from the ``attention_backend`` engine setting.

``auto`` takes the first of the platform's backends that can run
(:attr:`~auto_glm.platforms.Platform.attention_backends`: ``cpu`` then ``torch`` on the CPU;
``flashinfer`` where it is installed, then ``triton``, then ``torch`` on a CUDA GPU); an
explicit choice that cannot run is refused with the reason and the fix. ``auto`` logs why
it passed over each backend before the one it takes.
"""

from __future__ import annotations

import logging
from types import SimpleNamespace

import torch

from auto_glm.kernels import DECODE_HEAD_DIMS, KERNEL_DTYPES, cpu_kernels
from auto_glm.layers.attention_backends import flashinfer
from auto_glm.layers.attention_backends.base import AttentionBackend
from auto_glm.layers.attention_backends.cpu import CpuBackend
from auto_glm.layers.attention_backends.torch_sdpa import TorchBackend
from auto_glm.platforms import Platform

__all__ = ["ATTENTION_BACKENDS", "load_cpu_kernels", "select_attention_backend"]

ATTENTION_BACKENDS = ("auto", "torch", "cpu", "triton", "flashinfer")

log = logging.getLogger(__name__)


def load_cpu_kernels(
    platform: Platform, enabled: bool, dtype: torch.dtype
) -> tuple[SimpleNamespace | None, str]:
    """The native CPU kernels (building them on first use), or None and why they are off;
    ``enabled`` is the ``cpu_kernels`` engine setting."""
    if not platform.has_native_cpu_kernels:
        return None, f"they run on the CPU only, not on {platform.device}"
    if not enabled:
        return None, "cpu_kernels=False turns them off"
    if dtype not in KERNEL_DTYPES:
        built = " and ".join(str(d).removeprefix("torch.") for d in KERNEL_DTYPES)
        return None, f"they are built for {built}, not {str(dtype).removeprefix('torch.')}"
    kernels = cpu_kernels()
    if kernels is None:
        return None, "they could not be built here (see the warning above)"
    return kernels, ""


def _cpu_problem(head_dim: int, kernels: SimpleNamespace | None, kernels_off: str) -> str | None:
    if kernels is None:
        return kernels_off
    if head_dim not in DECODE_HEAD_DIMS:
        dims = ", ".join(map(str, DECODE_HEAD_DIMS))
        return f"its decode kernel is built for head_dim {dims}, not this model's {head_dim}"
    return None


def _triton_problem(platform: Platform, head_dim: int) -> str | None:
    reason = platform.triton_unavailable_reason()
    if reason is not None:
        return reason
    from auto_glm.kernels import triton as triton_kernels

    reason = triton_kernels.unavailable_reason()
    if reason is not None:
        return reason
    from auto_glm.kernels.triton.paged_attention import MAX_HEAD_DIM

    if head_dim > MAX_HEAD_DIM:
        return f"its kernels take head_dim up to {MAX_HEAD_DIM}, not this model's {head_dim}"
    return None


def select_attention_backend(
    setting: str,
    platform: Platform,
    *,
    head_dim: int,
    dtype: torch.dtype,
    kv_cache_dtype: str = "auto",
    kernels: SimpleNamespace | None,
    kernels_off: str = "",
) -> AttentionBackend:
    """The backend for ``attention_backend=setting``, for a model of ``head_dim`` computing
    in ``dtype`` with a ``kv_cache_dtype`` cache; ``kernels`` and ``kernels_off`` are what
    :func:`load_cpu_kernels` returned."""
    if setting not in ATTENTION_BACKENDS:
        raise ValueError(
            f"attention_backend={setting!r} is not a backend; use one of: "
            f"{', '.join(ATTENTION_BACKENDS)}"
        )

    def problem(name: str) -> str | None:
        if name == "cpu":
            return _cpu_problem(head_dim, kernels, kernels_off)
        if name == "triton":
            return _triton_problem(platform, head_dim)
        if name == "flashinfer":
            return flashinfer.problem(platform.device, head_dim, dtype, kv_cache_dtype)
        return None

    if setting == "auto":  # 'torch', last, always runs: the loop ends with reason None
        for name in platform.attention_backends:
            reason = problem(name)
            if reason is None:
                setting = name
                break
            log.info("attention_backend=auto: not %r on %s: %s", name, platform.device, reason)
    else:
        reason = problem(setting)
    if reason is not None and setting == "cpu":
        raise ValueError(
            f"attention_backend='cpu' needs the native CPU kernels, but {reason}; "
            "use attention_backend='torch' or 'auto'"
        )
    if reason is not None:
        raise ValueError(
            f"attention_backend={setting!r} cannot run on {platform.device}: {reason}; "
            "use attention_backend='auto' or 'torch'"
        )
    if setting == "torch":
        return TorchBackend()
    if setting == "cpu":
        return CpuBackend(kernels.paged_decode_attention)
    if setting == "flashinfer":
        return flashinfer.FlashInferBackend(platform.device)
    from auto_glm.layers.attention_backends.triton import TritonBackend

    return TritonBackend()
