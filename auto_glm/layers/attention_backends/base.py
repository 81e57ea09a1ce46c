"""The attention-backend interface, and the step layout every backend builds its metadata
from.

A backend turns one step's :class:`StepLayout` (plain lists, filled by the engine) into its
own metadata once per step, says how each layer's K/V cache is shaped, and computes the
attention of a layer whose new K/V :class:`~auto_glm.layers.attention.Attention` has
already written into the cache.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import torch

if TYPE_CHECKING:
    from auto_glm.layers.attention import Attention

__all__ = ["AttentionBackend", "ScheduledSequence", "StepLayout"]


@dataclass
class ScheduledSequence:
    """One request's tokens in a step."""

    query_start: int  # row of its first token in the packed batch
    query_len: int  # tokens fed this step
    context_len: int  # its tokens already in the cache before this step (start position)
    block_table: list[int]  # block ids holding its positions 0.. in order


@dataclass
class StepLayout:
    """The packed batch of one step: single-token decodes first, then prefill chunks."""

    slot_mapping: list[int]  # [num_tokens] cache slot each fed token's K/V is written to
    sequences: list[ScheduledSequence]  # in batch row order
    num_decodes: int  # the first num_decodes sequences feed one token each
    block_size: int


class AttentionBackend(ABC):
    """How attention is computed on one device; one instance serves every layer of a model.

    Its metadata object must carry ``slot_mapping`` (``[num_tokens]`` int64 on the device):
    the layer writes each token's K/V there before calling :meth:`forward`.
    """

    name: ClassVar[str]
    # decode steps can run through the persistent buffers of auto_glm.engine.cuda_graphs
    # (decode_metadata, prepare_decode)
    supports_decode_graphs: ClassVar[bool] = False

    def bind(self, layers: Sequence[Attention]) -> None:
        """Called once with every attention layer of the model this backend serves, before
        their caches are allocated."""
        return None

    def kv_cache_shape(self, num_slots: int, num_kv_heads: int, head_dim: int) -> tuple[int, ...]:
        """Shape of one layer's K (and V) cache: ``[num_slots, H_kv, head_dim]``, slot
        ``block * block_size + offset`` holding one token's heads."""
        return (num_slots, num_kv_heads, head_dim)

    @abstractmethod
    def build_metadata(self, layout: StepLayout, device: torch.device) -> Any:
        """This backend's metadata for a step, with its tensors on ``device``."""

    @abstractmethod
    def forward(
        self, layer: Attention, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, metadata: Any
    ) -> torch.Tensor:
        """q: [T, H, D], k/v: [T, H_kv, D] (already in ``layer``'s cache) -> [T, H, D]."""

    def decode_metadata(
        self,
        slot_mapping: torch.Tensor,
        block_tables: torch.Tensor,
        context_lens: torch.Tensor,
        block_size: int,
    ) -> Any:
        """Metadata of every step of ``B`` decodes over buffers the caller owns and refills
        between steps (a CUDA graph's): ``slot_mapping`` ``[B]`` int64, ``block_tables``
        ``[B, max_blocks]`` and ``context_lens`` ``[B]`` int32; only where
        :attr:`supports_decode_graphs`."""
        raise NotImplementedError(f"the {self.name} backend has no decode graphs")

    def prepare_decode(self, metadata: Any, tables: np.ndarray, lens: np.ndarray) -> None:
        """Before each step through :meth:`decode_metadata`'s ``metadata`` (and before a
        graph of it is captured), on the host: the step's ``tables`` ``[B, max_blocks]`` and
        ``lens`` ``[B]``, the values its buffers are being refilled with. Nothing by
        default."""
        return None

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"
