"""The CPU: native C++ kernels, oneDNN weight pre-packing, bfloat16 where AVX512_BF16 or AMX
is present."""

from __future__ import annotations

import os

import psutil
import torch

from auto_glm.platforms.base import Platform

__all__ = ["CpuPlatform"]


class CpuPlatform(Platform):
    name = "cpu"
    attention_backends = ("cpu", "torch")
    has_native_cpu_kernels = True
    prepacks_linear_weights = True

    def supported_dtypes(self) -> tuple[torch.dtype, ...]:
        return (torch.float32, torch.bfloat16, torch.float16)

    def fast_dtypes(self) -> tuple[torch.dtype, ...]:
        # without AVX512_BF16 or AMX, bfloat16 matmuls are emulated at a third of float32's
        # speed; float16 is always emulated
        native_bf16 = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
        return (torch.float32, torch.bfloat16) if native_bf16 else (torch.float32,)

    def dtype_warning(self, dtype: torch.dtype) -> str | None:
        if dtype == torch.float16:  # it works, but its matmuls run tens of times slower
            return (
                "float16 on the CPU is very slow as a compute dtype; prefer --compute-dtype "
                "float32 (float16 weights compute in float32 unless told otherwise)"
            )
        return None

    def triton_unavailable_reason(self) -> str | None:
        missing = super().triton_unavailable_reason()
        if missing is not None:
            return missing
        if os.environ.get("TRITON_INTERPRET") != "1":
            return (
                "Triton kernels run on CPU tensors only in triton's interpreter "
                "(TRITON_INTERPRET=1 set before triton is imported), which is for tests"
            )
        return None

    def free_memory(self) -> int:
        return int(psutil.virtual_memory().available)
