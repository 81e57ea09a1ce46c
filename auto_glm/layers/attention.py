"""Attention over a packed batch of variable-length sequences with a paged K/V cache.

The model runner describes one step with :class:`AttentionMetadata` and installs it with
:func:`attention_metadata`; every attention layer reads it, writes the new K/V into the cache
through ``slot_mapping`` and attends through the slots of each sequence. Decodes (one query
token each) come first in the batch and share one call per layer; prefill chunks follow, one
SDPA call each. Decodes use the native CPU kernel of :mod:`auto_glm.kernels` when the model
runner installs it (it reads K/V in place through the block tables), torch's SDPA otherwise;
GPU kernels plug in behind the same metadata.

With a quantized cache (``kv_cache_dtype`` int8 or fp8_e4m3, :mod:`auto_glm.layers.kv_quant`)
each new token's K/V is quantized as it is written, with its scales in ``k_scale`` /
``v_scale``; the native decode kernel reads the quantized cache in place, the torch paths
dequantize what they gather. A prefill chunk from position 0 attends to its own K/V as
computed, like every chunk on a float cache.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import nn

from auto_glm.kernels import DECODE_HEAD_DIMS
from auto_glm.layers.kv_quant import SCALE_DTYPE, dequantize_kv, kv_storage_dtype, quantize_kv

__all__ = ["Attention", "AttentionMetadata", "PrefillChunk", "attention_metadata"]


@dataclass
class PrefillChunk:
    query_start: int  # offset of the chunk's first token in the packed batch
    query_len: int
    # [kv_len] slots of every key the chunk attends to (cached context + the chunk itself);
    # None when the chunk starts at position 0, so its own fresh K/V are all it needs
    kv_slots: torch.Tensor | None = None
    # [query_len, kv_len] True where attention is allowed (causal, bottom-right aligned);
    # None means a plain causal mask
    mask: torch.Tensor | None = None


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor  # [num_tokens] cache slot written by each token
    num_decodes: int = 0  # the first num_decodes tokens are single-token decodes
    block_size: int = 16
    # [num_decodes, max_blocks] block ids of each decode's context, padded with block 0
    decode_block_tables: torch.Tensor | None = None
    decode_context_lens: torch.Tensor | None = None  # [num_decodes] keys each decode sees
    prefills: list[PrefillChunk] = field(default_factory=list)
    _decode_mask: torch.Tensor | None = field(default=None, repr=False)

    def decode_mask(self) -> torch.Tensor:
        """[num_decodes, 1, 1, max_blocks * block_size] True where a key is real; built
        once per step, for the torch path only (the CPU kernel reads the lengths)."""
        if self._decode_mask is None:
            assert self.decode_block_tables is not None and self.decode_context_lens is not None
            tables, lens = self.decode_block_tables, self.decode_context_lens
            keys = torch.arange(tables.shape[1] * self.block_size, device=tables.device)
            self._decode_mask = (keys[None, :] < lens[:, None])[:, None, None, :]
        return self._decode_mask


# Per thread: each engine steps on its own loop thread, and one server may run several
# engines (models or versions) at once.
_local = threading.local()


@contextlib.contextmanager
def attention_metadata(metadata: AttentionMetadata) -> Iterator[None]:
    """Make ``metadata`` the one every attention layer reads during this forward pass."""
    previous = getattr(_local, "metadata", None)
    _local.metadata = metadata
    try:
        yield
    finally:
        _local.metadata = previous


class Attention(nn.Module):
    """Grouped-query attention; ``k_cache``/``v_cache`` are ``[num_slots, H_kv, head_dim]``,
    with ``k_scale``/``v_scale`` ``[num_slots, H_kv]`` when they are quantized (else None)."""

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
        # the native CPU kernel once enable_cpu_kernels() installs it; None: the torch path
        self.decode_kernel: Callable[..., None] | None = None

    def allocate_cache(
        self,
        num_slots: int,
        dtype: torch.dtype,
        kv_cache_dtype: str = "auto",
        device: torch.device | str = "cpu",
    ) -> None:
        """Zeroed caches of ``num_slots`` slots for a model computing in ``dtype``;
        ``kv_cache_dtype`` (resolved, see :mod:`auto_glm.layers.kv_quant`) picks their
        precision."""
        shape = (num_slots, self.num_kv_heads, self.head_dim)
        storage = kv_storage_dtype(kv_cache_dtype, dtype)
        self.k_cache = torch.zeros(shape, dtype=storage, device=device)  # [slots, H_kv, D]
        self.v_cache = torch.zeros_like(self.k_cache)
        self.k_scale = self.v_scale = None
        if kv_cache_dtype != "auto":
            self.k_scale = torch.zeros(shape[:2], dtype=SCALE_DTYPE, device=device)  # [slots, H_kv]
            self.v_scale = torch.zeros_like(self.k_scale)

    def non_finite_carriers(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The cache tensors a non-finite K/V value lands in: the values of a float cache,
        the scales of a quantized one (whose values stay finite)."""
        if self.k_scale is None or self.v_scale is None:
            return self.k_cache, self.v_cache
        return self.k_scale, self.v_scale

    def enable_cpu_kernels(self, kernels: SimpleNamespace) -> None:
        """Use the native decode kernel if it is built for this head dim."""
        if self.head_dim in DECODE_HEAD_DIMS:
            self.decode_kernel = kernels.paged_decode_attention

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q: [T, H, D], k/v: [T, H_kv, D] -> [T, H * D]."""
        md = _local.metadata
        if md is None:
            raise RuntimeError(
                "attention called outside attention_metadata(); use the model runner"
            )
        self._write(md.slot_mapping, k, v)
        out = torch.empty_like(q)
        n = md.num_decodes
        if n:
            if self.decode_kernel is not None:
                tables, lens = md.decode_block_tables, md.decode_context_lens
                kernel_args = (self.k_cache, self.v_cache, tables, lens, md.block_size, self.scale)
                self.decode_kernel(q[:n], *kernel_args, out[:n], self.k_scale, self.v_scale)
            else:
                out[:n] = self._decode_torch(q[:n], md)
        for chunk in md.prefills:
            rows = slice(chunk.query_start, chunk.query_start + chunk.query_len)
            if chunk.kv_slots is None:
                kp, vp = k[rows], v[rows]
            else:
                kp = self._gather(self.k_cache, self.k_scale, chunk.kv_slots, q.dtype)
                vp = self._gather(self.v_cache, self.v_scale, chunk.kv_slots, q.dtype)
            if self.group > 1:  # SDPA's enable_gqa falls off the CPU flash kernel
                kp, vp = kp.repeat_interleave(self.group, 1), vp.repeat_interleave(self.group, 1)
            # a batch dimension of 1: 3-D inputs fall off the CPU flash kernel onto the
            # math path, which is 2-3x slower
            op = F.scaled_dot_product_attention(
                q[rows].transpose(0, 1)[None],
                kp.transpose(0, 1)[None],
                vp.transpose(0, 1)[None],
                attn_mask=chunk.mask,
                is_causal=chunk.mask is None,
                scale=self.scale,
            )
            out[rows] = op[0].transpose(0, 1)
        return out.view(q.shape[0], -1)

    def _write(self, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store the new tokens' K/V [T, H_kv, D] in their slots, quantized if the cache is."""
        if self.k_scale is None or self.v_scale is None:
            self.k_cache.index_copy_(0, slots, k)
            self.v_cache.index_copy_(0, slots, v)
            return
        for x, cache, scales in ((k, self.k_cache, self.k_scale), (v, self.v_cache, self.v_scale)):
            values, scale = quantize_kv(x, cache.dtype)  # [T, H_kv, D], [T, H_kv]
            # index_copy_ has no float8 kernel: copy the bytes
            cache.view(torch.uint8).index_copy_(0, slots, values.view(torch.uint8))
            scales.index_copy_(0, slots, scale)

    @staticmethod
    def _gather(
        cache: torch.Tensor, scales: torch.Tensor | None, index: torch.Tensor, dtype: torch.dtype
    ) -> torch.Tensor:
        """Rows ``index`` of ``cache`` (slots or whole blocks, as its view has them), in
        ``dtype``: dequantized with the same rows of ``scales`` when there are any."""
        rows = cache.index_select(0, index)
        return rows if scales is None else dequantize_kv(rows, scales.index_select(0, index), dtype)

    def _decode_torch(self, q: torch.Tensor, md: AttentionMetadata) -> torch.Tensor:
        """Decode attention in plain torch: gather each context's blocks, then one SDPA."""
        n = q.shape[0]
        # the query heads of one KV group act as rows of one query: no K/V repeat needed
        qd = q.view(n, self.num_kv_heads, self.group, self.head_dim)
        # whole blocks, not slots: 16x fewer, longer copies (index_select, not fancy
        # indexing, which is ~10x slower); the mask hides the padded tail
        blocks = md.decode_block_tables.view(-1)
        shape = (-1, md.block_size, self.num_kv_heads, self.head_dim)
        scale_shape = shape[:3]
        ks = None if self.k_scale is None else self.k_scale.view(scale_shape)
        vs = None if self.v_scale is None else self.v_scale.view(scale_shape)
        kd = self._gather(self.k_cache.view(shape), ks, blocks, q.dtype)  # [B, bs, H_kv, D]
        vd = self._gather(self.v_cache.view(shape), vs, blocks, q.dtype)
        shape = (n, -1, self.num_kv_heads, self.head_dim)
        kd, vd = kd.view(shape).transpose(1, 2), vd.view(shape).transpose(1, 2)
        od = F.scaled_dot_product_attention(
            qd, kd, vd, attn_mask=md.decode_mask(), scale=self.scale
        )
        return od.reshape(n, self.num_heads, self.head_dim)
