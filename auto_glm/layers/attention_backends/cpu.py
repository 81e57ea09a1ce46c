"""The CPU backend: the torch backend with decodes in the native paged-attention kernel of
:mod:`auto_glm.kernels`, which reads K/V (float, int8 or fp8) in place through the block
tables instead of gathering them."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

from auto_glm.layers.attention_backends.torch_sdpa import AttentionMetadata, TorchBackend

if TYPE_CHECKING:
    from auto_glm.layers.attention import Attention

__all__ = ["CpuBackend"]


class CpuBackend(TorchBackend):
    """``decode_kernel`` is ``auto_glm.kernels.cpu_kernels().paged_decode_attention``; it
    takes float32 or bfloat16 queries of a head dim in ``auto_glm.kernels.DECODE_HEAD_DIMS``."""

    name = "cpu"

    def __init__(self, decode_kernel: Callable[..., None]) -> None:
        self.decode_kernel = decode_kernel

    def decode(
        self, layer: Attention, q: torch.Tensor, md: AttentionMetadata, out: torch.Tensor
    ) -> None:
        self.decode_kernel(
            q,
            layer.k_cache,
            layer.v_cache,
            md.decode_block_tables,
            md.decode_context_lens,
            md.block_size,
            layer.scale,
            out,
            layer.k_scale,
            layer.v_scale,
        )
