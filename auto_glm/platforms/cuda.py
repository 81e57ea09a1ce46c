"""A CUDA GPU: FlashInfer's or Triton kernels, CUDA graphs, bfloat16 from compute capability
8.0."""

from __future__ import annotations

from types import SimpleNamespace

import torch

from auto_glm.platforms.base import HostCopy, Platform
from auto_glm.platforms.timer import CudaEventTimer, StepTimer

__all__ = ["CudaPlatform"]


class _EventCopy(HostCopy):
    """A copy into pinned host memory, queued on the current stream; an event marks its end."""

    def __init__(self, tensor: torch.Tensor) -> None:
        super().__init__(torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True))
        self._host.copy_(tensor, non_blocking=True)
        self._done = torch.cuda.Event()
        self._done.record(torch.cuda.current_stream(tensor.device))

    def wait(self) -> torch.Tensor:
        self._done.synchronize()
        return self._host


class CudaPlatform(Platform):
    name = "cuda"
    attention_backends = ("flashinfer", "triton", "torch")
    supports_cuda_graphs = True
    runs_async = True
    compiles_kernels_on_first_use = True

    def supported_dtypes(self) -> tuple[torch.dtype, ...]:
        if torch.cuda.get_device_capability(self.device) >= (8, 0):
            return (torch.float32, torch.bfloat16, torch.float16)
        return (torch.float32, torch.float16)

    def fast_dtypes(self) -> tuple[torch.dtype, ...]:
        return self.supported_dtypes()

    def unsupported_dtype_message(self, dtype: torch.dtype) -> str:
        major, minor = torch.cuda.get_device_capability(self.device)
        return (
            f"{str(dtype).removeprefix('torch.')} is not supported on {self.device} (compute "
            f"capability {major}.{minor}; bfloat16 needs 8.0 or newer); use --dtype float16"
        )

    def fused_kernels(self, dtype: torch.dtype) -> SimpleNamespace | None:
        """Triton's, for bfloat16 and float16 models (see :mod:`auto_glm.kernels.triton.fused`)."""
        if self.triton_unavailable_reason() is not None:
            return None
        from auto_glm.kernels.triton import fused_kernels

        return fused_kernels(dtype)

    def on_device(self) -> torch.cuda.device:
        return torch.cuda.device(self.device)  # the thread's earlier device back on exit

    def free_memory(self) -> int:
        free, _ = torch.cuda.mem_get_info(self.device)
        return int(free)

    def synchronize(self) -> None:
        torch.cuda.synchronize(self.device)

    def copy_to_host(self, tensor: torch.Tensor) -> HostCopy:
        return _EventCopy(tensor)

    def step_timer(self) -> StepTimer:
        return CudaEventTimer(self.device)
