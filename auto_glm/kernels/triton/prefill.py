"""Triton kernel of varlen prefill attention over the paged KV cache: all of a step's
prefill chunks in one launch.

The grid's first axis has ``T // BLOCK_M + N`` programs for T packed queries in N chunks:
chunk c owns the program ids from ``query_start_loc[c] // BLOCK_M + c`` up to the next
chunk's first, at least ``ceil(len_c / BLOCK_M)`` of them, so the grid is known on the host
without reading the offsets; a program finds its chunk by counting the chunks that start at
or before it, and the ones past its chunk's last query block return at once. The second
axis is the query head. Attention is causal and bottom-right aligned: query i of a chunk of
length L, whose sequence holds ``seq_len`` keys, sees keys ``0 .. seq_len - L + i``.
"""

from __future__ import annotations

import triton
import triton.language as tl

from auto_glm.kernels.triton.common import STEP_VARYING, attend_tile, key_rows

__all__ = ["prefill_kernel"]


@triton.jit
def _chunk_of(query_start_ptr, num_chunks, pid, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr):
    """The chunk that program ``pid`` works for: the number of chunks c whose first program
    ``query_start[c] // BLOCK_M + c`` is at most ``pid``, less one."""
    count = tl.zeros((), dtype=tl.int32)
    for first_chunk in range(0, num_chunks, BLOCK_C):
        c = first_chunk + tl.arange(0, BLOCK_C)  # [BLOCK_C]
        c_mask = c < num_chunks
        starts = tl.load(query_start_ptr + c, mask=c_mask, other=0).to(tl.int32)
        owned = c_mask & (starts // BLOCK_M + c <= pid)
        count += tl.sum(owned.to(tl.int32), axis=0)
    return count - 1


@triton.jit(do_not_specialize=STEP_VARYING)
def prefill_kernel(
    q_ptr,  # [T, H, D]
    k_ptr,  # [num_slots, H_kv, D]
    v_ptr,  # [num_slots, H_kv, D]
    k_scale_ptr,  # [num_slots, H_kv] bfloat16 when QUANT
    v_scale_ptr,
    query_start_ptr,  # [N + 1]
    seq_lens_ptr,  # [N]
    tables_ptr,  # [N, max_blocks]
    out_ptr,  # [T, H, D]
    score_scale,
    block_size,
    num_chunks,
    stride_q_token,
    stride_q_head,
    stride_out_token,
    stride_out_head,
    stride_slot,
    stride_head,
    stride_scale_slot,
    stride_table,
    GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_C: tl.constexpr,
    QUANT: tl.constexpr,
    COMPUTE: tl.constexpr,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
):
    pid = tl.program_id(0)
    head = tl.program_id(1)
    chunk = _chunk_of(query_start_ptr, num_chunks, pid, BLOCK_M, BLOCK_C)
    query_start = tl.load(query_start_ptr + chunk).to(tl.int32)
    query_len = tl.load(query_start_ptr + chunk + 1).to(tl.int32) - query_start
    query_block = pid - (query_start // BLOCK_M + chunk)
    if query_block * BLOCK_M >= query_len:
        return
    seq_len = tl.load(seq_lens_ptr + chunk).to(tl.int32)
    prefix = seq_len - query_len  # keys cached before the chunk
    kv_head = head // GROUP

    m = query_block * BLOCK_M + tl.arange(0, BLOCK_M)  # [BLOCK_M] query index in the chunk
    d = tl.arange(0, BLOCK_D)
    n = tl.arange(0, BLOCK_N)
    m_mask = m < query_len
    d_mask = d < HEAD_DIM
    tokens = (query_start + m).to(tl.int64)  # [BLOCK_M] rows of q and out
    q_offs = tokens[:, None] * stride_q_token + head * stride_q_head + d[None, :]
    q_mask = m_mask[:, None] & d_mask[None, :]
    q = tl.load(q_ptr + q_offs, mask=q_mask, other=0.0)  # [BLOCK_M, BLOCK_D]

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    table_ptr = tables_ptr + chunk.to(tl.int64) * stride_table
    # the block's last query sees keys up to prefix + its index; key 0 is in the first tile
    # and every query (padded rows too) sees it, so no row is ever all -inf
    end = tl.minimum(seq_len, prefix + (query_block + 1) * BLOCK_M)
    for tile in range(0, end, BLOCK_N):
        pos = tile + n  # [BLOCK_N]
        key_mask = pos < end
        slots = key_rows(table_ptr, pos, block_size, key_mask)
        allowed = key_mask[None, :] & (pos[None, :] <= prefix + m[:, None])  # [BLOCK_M, BLOCK_N]
        m_i, l_i, acc = attend_tile(
            q, m_i, l_i, acc, k_ptr, v_ptr, k_scale_ptr, v_scale_ptr, slots, key_mask,
            allowed, kv_head, d, d_mask, score_scale, stride_slot, stride_head,
            stride_scale_slot, QUANT, COMPUTE, UPCAST, PRECISION, BLOCK_M, BLOCK_N,
        )  # fmt: skip

    out = acc / l_i[:, None]
    out_offs = tokens[:, None] * stride_out_token + head * stride_out_head + d[None, :]
    tl.store(out_ptr + out_offs, out.to(out_ptr.dtype.element_ty), mask=q_mask)
