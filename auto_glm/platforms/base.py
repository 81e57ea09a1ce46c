"""The :class:`Platform` interface and :func:`platform_for`, which picks one for a device."""

from __future__ import annotations

import contextlib
import importlib.util
from types import SimpleNamespace

import torch

from auto_glm.platforms.timer import StepTimer, WallTimer

__all__ = ["HostCopy", "Platform", "platform_for"]


class HostCopy:
    """A device tensor on its way to host memory: :meth:`wait` returns the host tensor once
    the copy is done. The base class holds a tensor that is already on the host."""

    def __init__(self, host: torch.Tensor) -> None:
        self._host = host

    def wait(self) -> torch.Tensor:
        return self._host


class Platform:
    """One device's capabilities; subclasses fill in the class attributes and methods."""

    name = ""
    # the attention backends attention_backend='auto' takes here, the first that can run
    # (see auto_glm.layers.attention_backends); 'torch', last, always can
    attention_backends: tuple[str, ...] = ("torch",)
    has_native_cpu_kernels = False  # auto_glm.kernels' C++ kernels run here
    supports_cuda_graphs = False
    # the device runs queued work while the host goes on: a forward pass returns once it is
    # launched, and the host waits only when it reads the results
    runs_async = False
    prepacks_linear_weights = False  # float32 linear weights are pre-packed for oneDNN
    # kernels are compiled or loaded on their first launch (Triton's, FlashInfer's): the
    # model runner launches them at start (auto_glm.engine.warm_up), not in a request's time
    compiles_kernels_on_first_use = False

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def supported_dtypes(self) -> tuple[torch.dtype, ...]:
        """Dtypes a model can compute in here."""
        raise NotImplementedError

    def fast_dtypes(self) -> tuple[torch.dtype, ...]:
        """Dtypes the hardware computes in natively; others are emulated or upcast."""
        raise NotImplementedError

    def default_dtype(self) -> torch.dtype:
        """The compute dtype of ``dtype='auto'``: bfloat16 where it is supported."""
        return torch.bfloat16 if torch.bfloat16 in self.supported_dtypes() else torch.float16

    def unsupported_dtype_message(self, dtype: torch.dtype) -> str:
        """Why ``dtype`` (not in :meth:`supported_dtypes`) cannot be used here, and the fix."""
        return f"{dtype} is not supported on {self.device}; use --dtype float32"

    def dtype_warning(self, dtype: torch.dtype) -> str | None:
        """A warning for a supported dtype that runs badly here, or None."""
        return None

    def triton_unavailable_reason(self) -> str | None:
        """None if Triton kernels can run here, else why not."""
        if importlib.util.find_spec("triton") is None:
            return "the triton package is not installed (pip install triton)"
        return None

    def fused_kernels(self, dtype: torch.dtype) -> SimpleNamespace | None:
        """Fused RMSNorm, SiLU-and-multiply and rotary kernels for a model computing in
        ``dtype`` here (``rms_norm``, ``add_rms_norm`` and ``silu_and_mul`` with the native CPU
        kernels' arguments, and ``rotary``), or None: the layers' torch paths. The CPU's come
        with its native kernels (:func:`auto_glm.layers.attention_backends.load_cpu_kernels`)
        instead."""
        return None

    def free_memory(self) -> int:
        """Bytes free now for the KV cache to take a fraction of."""
        raise NotImplementedError

    def on_device(self) -> contextlib.AbstractContextManager[None]:
        """A context in which this device is the calling thread's current one. Kernel
        launches, CUDA graph captures and FlashInfer's plans go to the current device, so the
        engine builds and steps in it; here there is no such thing."""
        return contextlib.nullcontext()

    def synchronize(self) -> None:
        """Wait until the work queued on the device is done."""

    def copy_to_host(self, tensor: torch.Tensor) -> HostCopy:
        """Start copying ``tensor`` to host memory behind the work queued so far; the host
        waits only in :meth:`HostCopy.wait`. Here the copy is made at once."""
        return HostCopy(tensor.cpu())

    def step_timer(self) -> StepTimer:
        """A timer of the model's forward passes that adds no host-device sync."""
        return WallTimer()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.device})"


def platform_for(device: torch.device | str) -> Platform:
    """The platform of ``device`` (a resolved ``cpu`` or ``cuda:N`` device)."""
    from auto_glm.platforms.cpu import CpuPlatform
    from auto_glm.platforms.cuda import CudaPlatform

    device = torch.device(device)
    if device.type == "cpu":
        return CpuPlatform(device)
    if device.type == "cuda":
        return CudaPlatform(device)
    raise ValueError(f"device {str(device)!r} has no platform; use cpu or cuda:N")
