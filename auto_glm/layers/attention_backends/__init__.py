"""Attention backends: how each device computes attention over the paged KV cache.

One :class:`AttentionBackend` per model, chosen by the model runner with
:func:`select_attention_backend` from the ``attention_backend`` engine setting, builds each
step's metadata from a :class:`StepLayout` and computes every layer's attention:

* ``torch`` (:class:`TorchBackend`): SDPA over gathered K/V, on any device.
* ``cpu`` (:class:`CpuBackend`): the torch backend with decodes in the native C++ kernel.
* ``triton`` (:class:`~auto_glm.layers.attention_backends.triton.TritonBackend`): the
  Triton launchers of :mod:`auto_glm.kernels.triton`, for CUDA GPUs (imported only when
  chosen).
* ``flashinfer`` (:class:`~auto_glm.layers.attention_backends.flashinfer.FlashInferBackend`):
  FlashInfer's paged kernels on CUDA GPUs, where the ``gpu`` extra installed them (the
  package is imported only when chosen).

The Triton and FlashInfer backends also serve the decode steps replayed from CUDA graphs
(``supports_decode_graphs``); their pages, as FlashInfer plans them, are built without a
GPU in :mod:`~auto_glm.layers.attention_backends.paged_csr`.
"""

from auto_glm.layers.attention_backends.base import (
    AttentionBackend,
    ScheduledSequence,
    StepLayout,
)
from auto_glm.layers.attention_backends.cpu import CpuBackend
from auto_glm.layers.attention_backends.selector import (
    ATTENTION_BACKENDS,
    load_cpu_kernels,
    select_attention_backend,
)
from auto_glm.layers.attention_backends.torch_sdpa import (
    AttentionMetadata,
    PrefillChunk,
    TorchBackend,
)

__all__ = [
    "ATTENTION_BACKENDS",
    "AttentionBackend",
    "AttentionMetadata",
    "CpuBackend",
    "PrefillChunk",
    "ScheduledSequence",
    "StepLayout",
    "TorchBackend",
    "load_cpu_kernels",
    "select_attention_backend",
]
