"""The plain-torch backend: SDPA over K/V gathered from the paged cache, on any device.

Decodes (one query token each) share one SDPA call per layer over their whole blocks, with
a mask hiding each context's padded tail; prefill chunks follow, one SDPA call each. A
chunk from position 0 attends to its own K/V as computed; a later chunk gathers its
context's slots (dequantized when the cache is int8 or fp8) under a bottom-right causal
mask.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from auto_glm.layers.attention_backends.base import AttentionBackend, StepLayout
from auto_glm.layers.kv_quant import dequantize_kv
from auto_glm.platforms.transfer import tensor_on

if TYPE_CHECKING:
    from auto_glm.layers.attention import Attention

__all__ = ["AttentionMetadata", "PrefillChunk", "TorchBackend", "gather_kv"]


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
    """One step's metadata for the torch and CPU-kernel backends."""

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


def gather_kv(
    cache: torch.Tensor, scales: torch.Tensor | None, index: torch.Tensor, dtype: torch.dtype
) -> torch.Tensor:
    """Rows ``index`` of ``cache`` (slots or whole blocks, as its view has them), in
    ``dtype``: dequantized with the same rows of ``scales`` when there are any (static
    scales, slot stride 0, read int8 poison as NaN: see :mod:`auto_glm.layers.kv_static`)."""
    rows = cache.index_select(0, index)
    if scales is None:
        return rows
    return dequantize_kv(rows, scales.index_select(0, index), dtype, scales.stride(0) == 0)


def _slots(block_table: torch.Tensor, block_size: int, length: int) -> torch.Tensor:
    """Cache slots of positions 0..length-1 of one sequence."""
    offsets = torch.arange(block_size, device=block_table.device)
    return (block_table[:, None] * block_size + offsets).flatten()[:length]


class TorchBackend(AttentionBackend):
    name = "torch"

    def build_metadata(self, layout: StepLayout, device: torch.device) -> AttentionMetadata:
        n = layout.num_decodes
        prefills: list[PrefillChunk] = []
        for seq in layout.sequences[n:]:
            if seq.context_len == 0:
                prefills.append(PrefillChunk(seq.query_start, seq.query_len))
                continue
            table = tensor_on(seq.block_table, torch.long, device)
            kv_len = seq.context_len + seq.query_len
            mask = (
                torch.arange(kv_len, device=device)[None, :]
                <= torch.arange(seq.context_len, kv_len, device=device)[:, None]
            )  # [query_len, kv_len]
            slots = _slots(table, layout.block_size, kv_len)
            prefills.append(PrefillChunk(seq.query_start, seq.query_len, slots, mask))
        md = AttentionMetadata(
            slot_mapping=tensor_on(layout.slot_mapping, torch.long, device),
            num_decodes=n,
            prefills=prefills,
        )
        if n:
            decodes = layout.sequences[:n]
            max_blocks = max(len(seq.block_table) for seq in decodes)
            md.block_size = layout.block_size
            md.decode_block_tables = tensor_on(
                [seq.block_table + [0] * (max_blocks - len(seq.block_table)) for seq in decodes],
                torch.long,
                device,
            )  # [n, max_blocks]
            md.decode_context_lens = tensor_on(
                [seq.context_len + 1 for seq in decodes], torch.long, device
            )  # [n]
        return md

    def forward(
        self,
        layer: Attention,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        metadata: AttentionMetadata,
    ) -> torch.Tensor:
        out = torch.empty_like(q)  # [T, H, D]
        n = metadata.num_decodes
        if n:
            self.decode(layer, q[:n], metadata, out[:n])
        for chunk in metadata.prefills:
            rows = slice(chunk.query_start, chunk.query_start + chunk.query_len)
            out[rows] = self._prefill(layer, q[rows], k[rows], v[rows], chunk)
        return out

    def decode(
        self, layer: Attention, q: torch.Tensor, md: AttentionMetadata, out: torch.Tensor
    ) -> None:
        """Decode attention in plain torch: gather each context's blocks, then one SDPA.
        q, out: [num_decodes, H, D]."""
        n = q.shape[0]
        h_kv, d = layer.num_kv_heads, layer.head_dim
        # the query heads of one KV group act as rows of one query: no K/V repeat needed
        qd = q.view(n, h_kv, layer.group, d)
        # whole blocks, not slots: 16x fewer, longer copies (index_select, not fancy
        # indexing, which is ~10x slower); the mask hides the padded tail
        blocks = md.decode_block_tables.view(-1)
        shape = (-1, md.block_size, h_kv, d)
        ks = None if layer.k_scale is None else layer.k_scale.view(shape[:3])
        vs = None if layer.v_scale is None else layer.v_scale.view(shape[:3])
        kd = gather_kv(layer.k_cache.view(shape), ks, blocks, q.dtype)  # [B * mb, bs, H_kv, D]
        vd = gather_kv(layer.v_cache.view(shape), vs, blocks, q.dtype)
        shape = (n, -1, h_kv, d)
        kd, vd = kd.view(shape).transpose(1, 2), vd.view(shape).transpose(1, 2)
        od = F.scaled_dot_product_attention(
            qd, kd, vd, attn_mask=md.decode_mask(), scale=layer.scale
        )
        out.copy_(od.reshape(n, layer.num_heads, d))

    @staticmethod
    def _prefill(
        layer: Attention, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, chunk: PrefillChunk
    ) -> torch.Tensor:
        """One chunk: q [n, H, D], its own k/v [n, H_kv, D] -> [n, H, D]."""
        if chunk.kv_slots is None:
            kp, vp = k, v
        else:
            kp = gather_kv(layer.k_cache, layer.k_scale, chunk.kv_slots, q.dtype)  # [kv, H_kv, D]
            vp = gather_kv(layer.v_cache, layer.v_scale, chunk.kv_slots, q.dtype)
        if layer.group > 1:  # SDPA's enable_gqa falls off the CPU flash kernel
            kp, vp = kp.repeat_interleave(layer.group, 1), vp.repeat_interleave(layer.group, 1)
        # a batch dimension of 1: 3-D inputs fall off the CPU flash kernel onto the math
        # path, which is 2-3x slower
        op = F.scaled_dot_product_attention(
            q.transpose(0, 1)[None],
            kp.transpose(0, 1)[None],
            vp.transpose(0, 1)[None],
            attn_mask=chunk.mask,
            is_causal=chunk.mask is None,
            scale=layer.scale,
        )
        return op[0].transpose(0, 1)
