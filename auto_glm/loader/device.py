"""Turn the user's ``device`` / ``dtype`` choices into torch objects, refusing impossible ones."""

from __future__ import annotations

import re
import warnings

import torch

from auto_glm.loader.errors import ModelLoadError
from auto_glm.platforms import platform_for

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
    platform = platform_for(device)
    if dtype is None or dtype == "auto":
        return platform.default_dtype()
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
    if resolved not in platform.supported_dtypes():
        raise ModelLoadError(platform.unsupported_dtype_message(resolved))
    return resolved


def resolve_compute_dtype(
    requested: str | torch.dtype | None, weight_dtype: torch.dtype, device: torch.device
) -> torch.dtype:
    """The dtype the model computes in; ``None``/``"auto"`` follows the weights, except that
    a device without native arithmetic in their dtype computes in float32.

    Such devices (CPUs with AVX-512 but not AVX512_BF16/AMX, or AVX2; GPUs older than
    compute capability 8.0 for bfloat16) emulate half-precision matmuls at a fraction of
    their float32 speed. Upcasting half-precision weights is exact, and float32 activations
    are at least as accurate, so the model's outputs keep their meaning. A compute dtype
    that runs badly here (float16 on the CPU) works, with a warning.
    """
    platform = platform_for(device)
    if requested is not None and requested != "auto":
        compute = resolve_dtype(requested, device)
    elif weight_dtype not in platform.fast_dtypes():
        compute = torch.float32
    else:
        compute = weight_dtype
    warning = platform.dtype_warning(compute)
    if warning is not None:
        warnings.warn(warning, stacklevel=2)
    return compute
