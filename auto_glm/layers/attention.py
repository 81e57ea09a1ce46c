"""Attention over a packed batch of variable-length sequences with a paged K/V cache.

The model runner builds one step's metadata with its attention backend (see
:mod:`auto_glm.layers.attention_backends`) and installs it with :func:`attention_metadata`;
every attention layer reads it, writes the new K/V into its cache through
``slot_mapping`` and hands the attention itself to the backend, which reads the cache
through the block tables. A layer uses the plain-torch backend until the model runner gives
the model another (:meth:`auto_glm.models.decoder.CausalLM.set_attention_backend`).

With a quantized cache (``kv_cache_dtype`` int8 or fp8_e4m3, :mod:`auto_glm.layers.kv_quant`)
each new token's K/V is quantized as it is written, with its scales in ``k_scale`` /
``v_scale``; the native CPU decode kernel reads the quantized cache in place, the torch
paths dequantize what they gather. A prefill chunk from position 0 attends to its own K/V as
computed, like every chunk on a float cache. With static scales (:attr:`Attention.static_kv_scales`,
see :mod:`auto_glm.layers.kv_static`) only the values are written: ``k_scale`` / ``v_scale``
are the layer's ``[H_kv]`` scales expanded to ``[num_slots, H_kv]`` (slot stride 0).
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator
from types import SimpleNamespace
from typing import Any

import torch
from torch import nn

from auto_glm.kernels import DECODE_HEAD_DIMS
from auto_glm.layers.attention_backends import (
    AttentionBackend,
    AttentionMetadata,
    CpuBackend,
    PrefillChunk,
    TorchBackend,
)
from auto_glm.layers.kv_quant import SCALE_DTYPE, kv_storage_dtype, quantize_kv
from auto_glm.layers.kv_static import is_poison, quantize_kv_static

__all__ = ["Attention", "AttentionMetadata", "PrefillChunk", "attention_metadata"]

# Per thread: each engine steps on its own loop thread, and one server may run several
# engines (models or versions) at once.
_local = threading.local()


@contextlib.contextmanager
def attention_metadata(metadata: Any) -> Iterator[None]:
    """Make ``metadata`` (built by the layers' backend) the one every attention layer reads
    during this forward pass."""
    previous = getattr(_local, "metadata", None)
    _local.metadata = metadata
    try:
        yield
    finally:
        _local.metadata = previous


class Attention(nn.Module):
    """Grouped-query attention; ``k_cache``/``v_cache`` are shaped by the backend
    (``[num_slots, H_kv, head_dim]`` for every backend so far), with ``k_scale``/``v_scale``
    ``[num_slots, H_kv]`` when they are quantized (else None): per slot, or with static
    scales the same ``[H_kv]`` for every slot (stride 0)."""

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, scale: float) -> None:
        super().__init__()
        if num_heads % num_kv_heads:
            raise ValueError(
                f"num_attention_heads={num_heads} is not a multiple of "
                f"num_key_value_heads={num_kv_heads}; the config is inconsistent"
            )
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.group = num_heads // num_kv_heads
        self.scale = scale
        self.k_cache = torch.empty(0)
        self.v_cache = torch.empty(0)
        self.k_scale: torch.Tensor | None = None
        self.v_scale: torch.Tensor | None = None
        # float32 ([H_kv], [H_kv]) K and V scales of a quantized cache, fixed per layer
        # (None: a scale per slot); set before allocate_cache
        self.static_kv_scales: tuple[torch.Tensor, torch.Tensor] | None = None
        self.backend: AttentionBackend = TorchBackend()
        # write_kv(k, v, k_cache, v_cache, slots): one launch for both (see enable_kernels)
        self._write_kv: Callable[..., None] | None = None

    def allocate_cache(
        self,
        num_slots: int,
        dtype: torch.dtype,
        kv_cache_dtype: str = "auto",
        device: torch.device | str = "cpu",
    ) -> None:
        """Zeroed caches of ``num_slots`` slots, in the backend's layout, for a model
        computing in ``dtype``; ``kv_cache_dtype`` (resolved, see
        :mod:`auto_glm.layers.kv_quant`) picks their precision, and
        :attr:`static_kv_scales` whether scales are per slot or per layer."""
        shape = self.backend.kv_cache_shape(num_slots, self.num_kv_heads, self.head_dim)
        storage = kv_storage_dtype(kv_cache_dtype, dtype)
        self.k_cache = torch.zeros(shape, dtype=storage, device=device)  # [slots, H_kv, D]
        self.v_cache = torch.zeros_like(self.k_cache)
        self.k_scale = self.v_scale = None
        if kv_cache_dtype == "auto":
            return
        if self.static_kv_scales is None:
            self.k_scale = torch.zeros(shape[:2], dtype=SCALE_DTYPE, device=device)  # [slots, H_kv]
            self.v_scale = torch.zeros_like(self.k_scale)
            return
        k, v = (s.to(device=device, dtype=SCALE_DTYPE) for s in self.static_kv_scales)
        self.k_scale, self.v_scale = k.expand(shape[:2]), v.expand(shape[:2])  # stride (0, 1)

    @property
    def has_static_scales(self) -> bool:
        """Whether the cache is quantized with per-layer scales (see allocate_cache)."""
        return self.k_scale is not None and self.k_scale.stride(0) == 0

    @torch.inference_mode()
    def scrub_blocks(self, block_ids: torch.Tensor, block_size: int) -> torch.Tensor:
        """Clear what non-finite K/V values left in the blocks ``block_ids`` [N] (int64, on
        the cache's device); returns bool [N], True where a block held any.

        They land in the values of a float cache, in the scales of a dynamically quantized
        one (whose values stay finite), and as poison values in a statically quantized one
        (see :mod:`auto_glm.layers.kv_static`). Each becomes zero; every finite value and
        every other byte stays as it is.
        """
        dirty = torch.zeros(block_ids.shape[0], dtype=torch.bool, device=block_ids.device)
        if self.has_static_scales:
            for cache in (self.k_cache, self.v_cache):
                raw = cache.view(torch.uint8)  # index_select has no float8 kernel
                blocks = raw.view(-1, block_size, *raw.shape[1:])  # [blocks, bs, H_kv, D]
                part = blocks.index_select(0, block_ids)
                poison = is_poison(part.view(cache.dtype))
                bad = poison.flatten(1).any(dim=1)  # [N]
                if bool(bad.any()):
                    blocks.index_copy_(0, block_ids, part.masked_fill_(poison, 0))
                    dirty |= bad
            return dirty
        quantized = self.k_scale is not None and self.v_scale is not None
        carriers = (self.k_scale, self.v_scale) if quantized else (self.k_cache, self.v_cache)
        for cache in carriers:
            blocks = cache.view(-1, block_size, *cache.shape[1:])  # [blocks, bs, ...]
            part = blocks.index_select(0, block_ids)
            bad = ~torch.isfinite(part).flatten(1).all(dim=1)  # [N]
            if bool(bad.any()):
                blocks.index_copy_(0, block_ids, part.nan_to_num_(0.0, 0.0, 0.0))
                dirty |= bad
        return dirty

    def enable_cpu_kernels(self, kernels: SimpleNamespace) -> None:
        """Give this layer alone the CPU backend, if its decode kernel is built for this
        head dim (the model runner picks one backend for all layers instead)."""
        if self.head_dim in DECODE_HEAD_DIMS:
            self.backend = CpuBackend(kernels.paged_decode_attention)

    def enable_kernels(self, kernels: SimpleNamespace) -> None:
        """Write K and V into a float cache in one fused launch, with ``kernels.write_kv``
        where it is given (a GPU platform's fused kernels)."""
        self._write_kv = getattr(kernels, "write_kv", None)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q: [T, H, D], k/v: [T, H_kv, D] -> [T, H * D]."""
        md = getattr(_local, "metadata", None)
        if md is None:
            raise RuntimeError(
                "attention called outside attention_metadata(); use the model runner"
            )
        self._write(md.slot_mapping, k, v)
        return self.backend.forward(self, q, k, v, md).view(q.shape[0], -1)

    def _write(self, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store the new tokens' K/V [T, H_kv, D] in their slots, quantized if the cache is."""
        if self.k_scale is None or self.v_scale is None:
            if self._write_kv is not None:
                self._write_kv(k, v, self.k_cache, self.v_cache, slots)
                return
            self.k_cache.index_copy_(0, slots, k)
            self.v_cache.index_copy_(0, slots, v)
            return
        static = self.has_static_scales
        for x, cache, scales in ((k, self.k_cache, self.k_scale), (v, self.v_cache, self.v_scale)):
            if static:
                values = quantize_kv_static(x, cache.dtype, scales[0])  # [T, H_kv, D]
            else:
                values, scale = quantize_kv(x, cache.dtype)  # [T, H_kv, D], [T, H_kv]
                scales.index_copy_(0, slots, scale)
            # index_copy_ has no float8 kernel: copy the bytes
            cache.view(torch.uint8).index_copy_(0, slots, values.view(torch.uint8))
