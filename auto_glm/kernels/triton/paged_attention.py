"""Launchers of the Triton paged attention kernels: decode (one query per sequence) and
varlen prefill (all of a step's chunks in one launch), reading K/V in place from caches
``[num_slots, H_kv, D]`` (slot = block_id * block_size + offset) through block tables.

Both take float32, bfloat16 or float16 queries (fp32 accumulation, online softmax), any head
dim up to ``MAX_HEAD_DIM`` (tiles are padded to a power of two and masked), grouped-query
attention (H a multiple of H_kv), int32 or int64 block tables and lengths, and a cache of
the queries' dtype or an int8 / float8_e4m3fn one with bfloat16 scales ``[num_slots, H_kv]``
(:mod:`auto_glm.layers.kv_quant`). Shapes, dtypes and devices are checked on the host
(:mod:`auto_glm.kernels.triton.checks`, which also says what is not checked).
"""

from __future__ import annotations

import math

import torch
import triton

from auto_glm.kernels.triton.checks import (
    MAX_HEAD_DIM,
    check_attention,
    check_index,
    dot_options,
    padded_head_dim,
    scale_stride,
)
from auto_glm.kernels.triton.decode import (
    decode_kernel,
    decode_packed_kernel,
    decode_reduce_kernel,
)
from auto_glm.kernels.triton.prefill import prefill_kernel
from auto_glm.kernels.triton.staged import launch_staged
from auto_glm.kernels.triton.tiles import DecodeTiles, tuned_tiles

__all__ = ["MAX_HEAD_DIM", "paged_decode_attention", "paged_prefill_attention"]

_LOG2E = math.log2(math.e)  # the kernels' softmax runs in base 2 (exp2)
# split-K of decode: split only while (sequences x KV heads) programs leave the GPU idle
# (about two per SM of a 132-SM H100/H200), and give each split at least this many keys
_BUSY_PROGRAMS = 256
_MIN_KEYS_PER_SPLIT = 256
_MAX_SPLITS = 64
# rows (keys x KV heads) of a packed-heads decode tile
_MAX_PACKED_ROWS = 256
# prefill's warps: sm_90 builds (compiled without a GPU, ptxas -v) keep float caches free
# of register spills at head dims 128 and 256; not yet tuned on a GPU
_NUM_WARPS = 8
# prefill's pipeline stages: 5 keep one K/V tile in flight while the one before is computed
# on (see auto_glm.kernels.triton.staged, which takes fewer where shared memory is short)
_NUM_STAGES = 5
# prefill chunks a program scans per step while it looks for its own
_CHUNKS_PER_SCAN = 64


def paged_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    block_size: int,
    scale: float,
    out: torch.Tensor,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
    *,
    num_splits: int | None = None,
    tiles: DecodeTiles | None = None,
) -> None:
    """Decode attention into ``out``: q/out ``[B, H, D]`` (last dim contiguous), caches
    ``[num_slots, H_kv, D]``, ``block_tables`` ``[B, max_blocks]`` (padded past each
    context), ``context_lens`` ``[B]`` keys each query sees (>= 1). ``num_splits`` forces
    the number of split-K partitions (default: chosen from the batch and the table width);
    ``tiles`` the kernel's tiling (default: the one recorded for this card, dtypes and
    attention shape, see :mod:`auto_glm.kernels.triton.tiles`, else :class:`DecodeTiles`'s)."""
    name = "paged_decode_attention"
    quant = check_attention(name, q, k_cache, v_cache, block_size, out, k_scale, v_scale)
    batch, heads, head_dim = q.shape
    check_index(name, "block_tables", block_tables, (batch, None), q.device)
    check_index(name, "context_lens", context_lens, (batch,), q.device)
    if batch == 0:
        return
    kv_heads = k_cache.shape[1]
    group = heads // kv_heads
    capacity = block_tables.shape[1] * block_size
    shape = (heads, kv_heads, head_dim)
    tiles = tiles or tuned_tiles(q.device, q.dtype, k_cache.dtype, shape, batch)
    if tiles.packed_heads:
        _check_packed(name, tiles, kv_heads, quant)
    programs = batch if tiles.packed_heads else batch * kv_heads  # per split
    splits = _decode_splits(programs, capacity) if num_splits is None else num_splits
    if splits < 1:
        raise ValueError(f"{name}: num_splits={splits} must be at least 1")
    keys_per_split = triton.cdiv(triton.cdiv(capacity, splits), tiles.block_n) * tiles.block_n
    block_d = padded_head_dim(head_dim)
    if splits > 1:
        part_max = torch.empty(batch, heads, splits, dtype=torch.float32, device=q.device)
        part_sum = torch.empty_like(part_max)
        part_acc = torch.empty(batch, heads, splits, head_dim, dtype=torch.float32, device=q.device)
    else:
        part_max = part_sum = part_acc = out  # not written to
    strides = (q.stride(0), q.stride(1), out.stride(0), out.stride(1))
    if tiles.packed_heads:
        args = (
            q, k_cache, v_cache, block_tables, context_lens, out, part_max, part_sum, part_acc,
            scale * _LOG2E, block_size, keys_per_split, heads, *strides,
            k_cache.stride(0), k_cache.stride(1), block_tables.stride(0),
        )  # fmt: skip
        options = dict(
            GROUP=group, KV_HEADS=kv_heads, HEAD_DIM=head_dim,
            BLOCK_H=max(16, triton.next_power_of_2(heads)), BLOCK_D=block_d,
            BLOCK_N=tiles.block_n, SPLIT=splits > 1, num_warps=tiles.num_warps,
            **dot_options(q.dtype),
        )  # fmt: skip
        launch_staged(decode_packed_kernel, (batch, splits), args, options, tiles.num_stages)
    else:
        scales = (k_scale, v_scale) if quant else (k_cache, v_cache)  # not read unless quant
        grid = (kv_heads, batch, splits) if tiles.heads_first else (batch, kv_heads, splits)
        args = (
            q, k_cache, v_cache, *scales, block_tables, context_lens, out,
            part_max, part_sum, part_acc, scale * _LOG2E, block_size, keys_per_split, heads,
            *strides, k_cache.stride(0), k_cache.stride(1), scale_stride(k_scale, quant),
            block_tables.stride(0),
        )  # fmt: skip
        options = dict(
            GROUP=group, HEAD_DIM=head_dim, BLOCK_G=max(16, triton.next_power_of_2(group)),
            BLOCK_D=block_d, BLOCK_N=tiles.block_n, SPLIT=splits > 1, QUANT=quant,
            HEADS_FIRST=tiles.heads_first, num_warps=tiles.num_warps, **dot_options(q.dtype),
        )  # fmt: skip
        launch_staged(decode_kernel, grid, args, options, tiles.num_stages)
    if splits > 1:
        decode_reduce_kernel[(batch, heads)](
            part_max, part_sum, part_acc, out, heads, splits, out.stride(0), out.stride(1),
            HEAD_DIM=head_dim, BLOCK_S=triton.next_power_of_2(splits), BLOCK_D=block_d,
        )  # fmt: skip


def paged_prefill_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    query_start_loc: torch.Tensor,
    seq_lens: torch.Tensor,
    block_tables: torch.Tensor,
    block_size: int,
    scale: float,
    out: torch.Tensor,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
) -> None:
    """Causal varlen prefill into ``out`` for N chunks packed in q/out ``[T, H, D]``:
    ``query_start_loc`` ``[N + 1]`` offsets of each chunk's queries (0 first, T last),
    ``seq_lens`` ``[N]`` keys each chunk attends to (its cached prefix plus the chunk, whose
    K/V are already in the cache), ``block_tables`` ``[N, max_blocks]``. Query i of a chunk
    of length L sees keys ``0 .. seq_len - L + i`` (bottom-right aligned)."""
    name = "paged_prefill_attention"
    quant = check_attention(name, q, k_cache, v_cache, block_size, out, k_scale, v_scale)
    tokens, heads, head_dim = q.shape
    num_chunks = seq_lens.shape[0] if seq_lens.dim() == 1 else -1
    check_index(name, "seq_lens", seq_lens, (num_chunks,), q.device)
    check_index(name, "query_start_loc", query_start_loc, (num_chunks + 1,), q.device)
    check_index(name, "block_tables", block_tables, (num_chunks, None), q.device)
    if num_chunks == 0 or tokens == 0:
        return
    kv_heads = k_cache.shape[1]
    block_m, block_n = (64, 64) if head_dim <= 128 else (32, 32)
    scales = (k_scale, v_scale) if quant else (k_cache, v_cache)  # not read unless quant
    args = (
        q, k_cache, v_cache, *scales, query_start_loc, seq_lens, block_tables, out,
        scale * _LOG2E, block_size, num_chunks,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        k_cache.stride(0), k_cache.stride(1), scale_stride(k_scale, quant), block_tables.stride(0),
    )  # fmt: skip
    options = dict(
        GROUP=heads // kv_heads, HEAD_DIM=head_dim, BLOCK_M=block_m, BLOCK_N=block_n,
        BLOCK_D=padded_head_dim(head_dim), BLOCK_C=_CHUNKS_PER_SCAN, QUANT=quant,
        num_warps=_NUM_WARPS, **dot_options(q.dtype),
    )  # fmt: skip
    grid = (tokens // block_m + num_chunks, heads)
    launch_staged(prefill_kernel, grid, args, options, _NUM_STAGES)


def _check_packed(name: str, tiles: DecodeTiles, kv_heads: int, quant: bool) -> None:
    """The packed-heads decode reads float caches, in tiles of block_n x H_kv rows (a power
    of two, 16 to 256: tl.dot's and the registers' bounds)."""
    rows = tiles.block_n * kv_heads
    if quant:
        raise ValueError(
            f"{name}: DecodeTiles(packed_heads=True) reads float caches only, not a quantized "
            "one; use packed_heads=False"
        )
    if not (16 <= rows <= _MAX_PACKED_ROWS and rows & (rows - 1) == 0):
        raise ValueError(
            f"{name}: DecodeTiles(packed_heads=True, block_n={tiles.block_n}) tiles "
            f"{tiles.block_n} keys x {kv_heads} KV heads = {rows} rows, which must be a power "
            f"of two from 16 to {_MAX_PACKED_ROWS}: pick block_n so, or packed_heads=False"
        )


def _decode_splits(programs: int, capacity: int) -> int:
    """Split-K partitions of decode for ``programs`` per split (sequences x KV heads, or
    sequences with packed heads) over block tables of ``capacity`` keys."""
    if programs >= _BUSY_PROGRAMS:
        return 1
    by_length = triton.cdiv(capacity, _MIN_KEYS_PER_SPLIT)
    return max(1, min(by_length, triton.cdiv(_BUSY_PROGRAMS, programs), _MAX_SPLITS))
