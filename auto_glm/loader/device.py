"""Turn the user's ``device`` / ``dtype`` choices into torch objects, refusing impossible ones."""

from __future__ import annotations

import re
import warnings

import torch

from auto_glm.loader.errors import ModelLoadError

__all__ = ["DTYPE_NAMES", "resolve_device", "resolve_dtype"]

DTYPE_NAMES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}
_CUDA_DEVICE = re.compile(r"^cuda(:\d+)?$")


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``"auto"`` (a CUDA GPU if there is one, else CPU), ``"cpu"``, ``"cuda"``, ``"cuda:N"``."""
    name = str(device).strip().lower()
    if name == "auto":
        return torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    if name == "cpu":
        return torch.device("cpu")
    if not _CUDA_DEVICE.match(name):
        raise ModelLoadError(f"unknown device {str(device)!r}; use one of: auto, cpu, cuda, cuda:N")
    if not torch.cuda.is_available():
        reason = (
            f"this torch build ({torch.__version__}) has no CUDA support"
            if torch.version.cuda is None
            else "torch sees no CUDA GPU"
        )
        raise ModelLoadError(
            f"device {str(device)!r} requested but no CUDA GPU is available ({reason}); "
            "use --device cpu, or install a CUDA build of torch (see the README)"
        )
    index = int(name.partition(":")[2] or 0)
    count = torch.cuda.device_count()
    if index >= count:
        raise ModelLoadError(
            f"device {str(device)!r} requested but only {count} CUDA GPU(s) are visible; "
            f"use one of cuda:0..cuda:{count - 1}"
        )
    return torch.device("cuda", index)


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """The compute dtype: a name from ``DTYPE_NAMES``, a torch dtype, or ``None``/``"auto"``.

    The default is bfloat16 (the dtype GLM and most current checkpoints ship in); on a
    GPU without bfloat16 support it is float16.
    """
    if dtype is None or dtype == "auto":
        if device.type == "cuda" and not _cuda_has_bf16(device):
            return torch.float16
        return torch.bfloat16
    if isinstance(dtype, str):
        resolved = DTYPE_NAMES.get(dtype.strip().lower())
        if resolved is None:
            raise ModelLoadError(
                f"unknown dtype {dtype!r}; use one of: auto, {', '.join(DTYPE_NAMES)}"
            )
    elif isinstance(dtype, torch.dtype) and dtype in DTYPE_NAMES.values():
        resolved = dtype
    else:
        raise ModelLoadError(
            f"unsupported dtype {dtype!r}; use torch.float32, torch.bfloat16 or torch.float16"
        )
    if resolved == torch.bfloat16 and device.type == "cuda" and not _cuda_has_bf16(device):
        major, minor = torch.cuda.get_device_capability(device)
        raise ModelLoadError(
            f"bfloat16 is not supported on {device} (compute capability {major}.{minor}; "
            "bfloat16 needs 8.0 or newer); use --dtype float16"
        )
    if resolved == torch.float16 and device.type == "cpu":
        # It works, but CPU float16 matmuls run tens of times slower than float32.
        warnings.warn(
            "float16 on the CPU is very slow; prefer --dtype bfloat16 or --dtype float32",
            stacklevel=2,
        )
    return resolved


def resolve_compute_dtype(
    requested: str | torch.dtype | None, weight_dtype: torch.dtype, device: torch.device
) -> torch.dtype:
    """The dtype the model computes in; ``None``/``"auto"`` follows the weights, except that
    a CPU without native half-precision arithmetic computes in float32.

    Such CPUs (AVX-512 without AVX512_BF16/AMX, AVX2) emulate bfloat16 matmuls at a third of
    their float32 speed. Upcasting half-precision weights is exact, and float32 activations
    are at least as accurate, so the model's outputs keep their meaning.
    """
    if requested is not None and requested != "auto":
        return resolve_dtype(requested, device)
    if device.type == "cpu" and weight_dtype in (torch.bfloat16, torch.float16):
        native = weight_dtype == torch.bfloat16 and (
            torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
        )
        if not native:
            return torch.float32
    return weight_dtype


def _cuda_has_bf16(device: torch.device) -> bool:
    return torch.cuda.get_device_capability(device) >= (8, 0)
