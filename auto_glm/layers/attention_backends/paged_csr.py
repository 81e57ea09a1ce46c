"""A step's pages as compressed sparse rows: the page lists that FlashInfer's wrappers
plan with, built on the host with no device and no FlashInfer (so they are tested
without either).

Sequence ``i`` holds ``lens[i]`` keys in pages ``indices[indptr[i]:indptr[i + 1]]`` (its
block table's first ``ceil(lens[i] / block_size)`` entries); its last page holds
``last_page_len[i]`` of them, from 1 to ``block_size``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

__all__ = ["PagedCsr", "padded_tables", "paged_csr", "query_starts"]


def padded_tables(tables: Sequence[Sequence[int]]) -> list[list[int]]:
    """Block tables as rows of one width (the longest), padded with block 0."""
    width = max((len(t) for t in tables), default=0)
    return [[*t, *[0] * (width - len(t))] for t in tables]


@dataclass
class PagedCsr:
    indptr: np.ndarray  # [B + 1] int32, from 0
    indices: np.ndarray  # [indptr[-1]] int32 block ids
    last_page_len: np.ndarray  # [B] int32, 1..block_size

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The three arrays as host tensors (sharing their memory), in that order."""
        return tuple(torch.from_numpy(a) for a in (self.indptr, self.indices, self.last_page_len))


def query_starts(query_lens: Sequence[int]) -> torch.Tensor:
    """[B + 1] int32 host tensor: where each sequence's query rows start, then the end (the
    ``qo_indptr`` FlashInfer's prefill plans with)."""
    starts = np.zeros(len(query_lens) + 1, dtype=np.int32)
    np.cumsum(query_lens, out=starts[1:])
    return torch.from_numpy(starts)


def paged_csr(tables: np.ndarray, lens: np.ndarray, block_size: int) -> PagedCsr:
    """The pages of ``B`` sequences: ``tables`` [B, W] block ids (entries past a sequence's
    pages are not read), ``lens`` [B] keys of each, every one at least 1."""
    lens = np.asarray(lens, dtype=np.int32)
    if lens.size and int(lens.min()) < 1:
        raise ValueError(f"every sequence needs at least one key; got lens {lens.tolist()}")
    pages = (lens + block_size - 1) // block_size  # [B]
    indptr = np.zeros(lens.size + 1, dtype=np.int32)
    np.cumsum(pages, out=indptr[1:])
    width = np.asarray(tables).shape[1] if lens.size else 0
    if int(pages.max(initial=0)) > width:
        raise ValueError(f"a sequence of {int(lens.max())} keys needs more than {width} blocks")
    used = np.arange(width)[None, :] < pages[:, None]  # [B, W], row-major: pages in order
    indices = np.asarray(tables, dtype=np.int32).reshape(lens.size, width)[used]
    last = (lens - (pages - 1) * block_size).astype(np.int32)
    return PagedCsr(indptr, indices, last)
