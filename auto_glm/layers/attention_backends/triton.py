"""The Triton backend: the paged decode and prefill launchers of
:mod:`auto_glm.kernels.triton` (imported when the backend is built, so a machine without
triton never imports them), reading K/V in place through the block tables.

A step takes at most two launches per layer: one for its decodes, one for all of its
prefill chunks (each chunk's own K/V already in the cache; causal, bottom-right aligned).
:meth:`TritonBackend.decode_metadata` serves decode-only steps replayed from CUDA graphs
(:mod:`auto_glm.engine.cuda_graphs`).
The launchers read a cache in the model's dtype, or an int8 / fp8 one with its scales.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from auto_glm.layers.attention_backends.base import AttentionBackend, StepLayout
from auto_glm.layers.attention_backends.paged_csr import padded_tables
from auto_glm.platforms.transfer import tensor_on

if TYPE_CHECKING:
    from auto_glm.layers.attention import Attention

__all__ = ["TritonBackend", "TritonMetadata"]


@dataclass
class TritonMetadata:
    """One step's tensors for the Triton launchers, built once per step on the device."""

    slot_mapping: torch.Tensor  # [num_tokens] int64 cache slot written by each token
    block_size: int
    num_decodes: int  # rows 0..num_decodes-1 are single-token decodes
    decode_block_tables: torch.Tensor  # [num_decodes, max_blocks] int32, padded with 0
    decode_context_lens: torch.Tensor  # [num_decodes] int32 keys each decode sees
    # prefill chunks, rows num_decodes.. of the batch; starts relative to row num_decodes
    prefill_query_start_loc: torch.Tensor  # [num_prefills + 1] int32
    prefill_seq_lens: torch.Tensor  # [num_prefills] int32 context + chunk length
    prefill_block_tables: torch.Tensor  # [num_prefills, max_blocks] int32, padded with 0


class TritonBackend(AttentionBackend):
    name = "triton"
    supports_decode_graphs = True

    def __init__(self) -> None:
        kernels = importlib.import_module("auto_glm.kernels.triton")
        self._decode = kernels.paged_decode_attention
        self._prefill = kernels.paged_prefill_attention

    def build_metadata(self, layout: StepLayout, device: torch.device) -> TritonMetadata:
        n = layout.num_decodes
        decodes, prefills = layout.sequences[:n], layout.sequences[n:]
        starts = [seq.query_start - n for seq in prefills]
        starts.append(len(layout.slot_mapping) - n)

        def ints(values: list) -> torch.Tensor:
            return tensor_on(values, torch.int32, device)

        return TritonMetadata(
            slot_mapping=tensor_on(layout.slot_mapping, torch.long, device),
            block_size=layout.block_size,
            num_decodes=n,
            decode_block_tables=ints(padded_tables([seq.block_table for seq in decodes])),
            decode_context_lens=ints([seq.context_len + 1 for seq in decodes]),
            prefill_query_start_loc=ints(starts),
            prefill_seq_lens=ints([seq.context_len + seq.query_len for seq in prefills]),
            prefill_block_tables=ints(padded_tables([seq.block_table for seq in prefills])),
        )

    def decode_metadata(
        self,
        slot_mapping: torch.Tensor,
        block_tables: torch.Tensor,
        context_lens: torch.Tensor,
        block_size: int,
    ) -> TritonMetadata:
        """The launchers depend on the buffers' shapes alone, so one metadata serves every
        step of that batch size."""
        device = slot_mapping.device
        no_prefill = torch.zeros(1, dtype=torch.int32, device=device)  # [num_prefills + 1]
        return TritonMetadata(
            slot_mapping=slot_mapping,
            block_size=block_size,
            num_decodes=slot_mapping.shape[0],
            decode_block_tables=block_tables,
            decode_context_lens=context_lens,
            prefill_query_start_loc=no_prefill,
            prefill_seq_lens=no_prefill[:0],
            prefill_block_tables=torch.zeros(0, 1, dtype=torch.int32, device=device),
        )

    def forward(
        self,
        layer: Attention,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        metadata: TritonMetadata,
    ) -> torch.Tensor:
        out = torch.empty_like(q)  # [T, H, D]
        md, n = metadata, metadata.num_decodes
        caches, scales = (layer.k_cache, layer.v_cache), (layer.k_scale, layer.v_scale)
        if n:
            tables, lens = md.decode_block_tables, md.decode_context_lens
            self._decode(q[:n], *caches, tables, lens, md.block_size, layer.scale, out[:n], *scales)
        if q.shape[0] > n:
            self._prefill(
                q[n:],
                *caches,
                md.prefill_query_start_loc,
                md.prefill_seq_lens,
                md.prefill_block_tables,
                md.block_size,
                layer.scale,
                out[n:],
                *scales,
            )
        return out
