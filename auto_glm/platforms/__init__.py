"""What the machine a model runs on can do: one :class:`Platform` per device type.

The engine, the loader and the model runner ask the platform instead of testing
``device.type``: which dtypes it computes in natively, whether the native CPU kernels,
Triton kernels or CUDA graphs can run there, how much memory is free for the KV cache, the
attention backends ``attention_backend='auto'`` picks from, how to make the engine's device
the current one of a thread (:meth:`Platform.on_device`), how to wait for queued work, how to
read results back without waiting at once (:class:`HostCopy`), how to send host values
without waiting (:mod:`auto_glm.platforms.transfer`), and how to time forward
passes without waiting (:mod:`auto_glm.platforms.timer`).
"""

from auto_glm.platforms.base import HostCopy, Platform, platform_for
from auto_glm.platforms.cpu import CpuPlatform
from auto_glm.platforms.cuda import CudaPlatform
from auto_glm.platforms.timer import CudaEventTimer, StepTimer, WallTimer
from auto_glm.platforms.transfer import pinned, tensor_on, to_device

__all__ = [
    "CpuPlatform",
    "CudaEventTimer",
    "CudaPlatform",
    "HostCopy",
    "Platform",
    "StepTimer",
    "WallTimer",
    "pinned",
    "platform_for",
    "tensor_on",
    "to_device",
]
