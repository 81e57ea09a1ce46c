"""Triton kernels of paged decode attention: one query token per sequence.

A program attends for one (sequence, KV head, split): the query heads of the KV group are
the rows of its score tile, so each K/V tile is read once per group. With ``HEADS_FIRST``
the KV head is the grid's first axis, so that the programs of one sequence's heads, which
read neighbouring parts of the same cache rows, are launched together. With one split it
writes the normalized output; with several (split-K, for long contexts and small batches)
each writes its partial max, sum and weighted values, and :func:`decode_reduce_kernel`
merges them per (sequence, head).

:func:`decode_packed_kernel` is the same attention with one program per (sequence, split)
for all KV heads: its key tiles are whole cache rows (every KV head of ``BLOCK_N`` keys,
contiguous in memory where the keys share a block), its score tile pairs every query head
with every row, and rows of another head are masked out. That multiplies the products by
the KV heads (cheap in decode, which waits on memory) in exchange for reading whole rows.
"""

from __future__ import annotations

import triton
import triton.language as tl

from auto_glm.kernels.triton.common import STEP_VARYING, attend_tile, key_rows, mma

__all__ = ["decode_kernel", "decode_packed_kernel", "decode_reduce_kernel"]


@triton.jit
def _finish(
    out_ptr, part_max_ptr, part_sum_ptr, part_acc_ptr,
    m_i, l_i, acc,  # [rows], [rows], [rows, BLOCK_D] of the query heads ``heads`` [rows]
    seq, heads, split, num_splits, num_heads, stride_out_seq, stride_out_head,
    d, heads_mask, out_mask,
    HEAD_DIM: tl.constexpr,
    SPLIT: tl.constexpr,
):  # fmt: skip
    """Store a program's result: with one split the normalized output; with several its
    partial max, sum and weighted values, for :func:`decode_reduce_kernel`."""
    if SPLIT:
        row = (seq * num_heads + heads) * num_splits + split  # [rows]
        tl.store(part_max_ptr + row, m_i, mask=heads_mask)
        tl.store(part_sum_ptr + row, l_i, mask=heads_mask)
        tl.store(part_acc_ptr + row[:, None] * HEAD_DIM + d[None, :], acc, mask=out_mask)
    else:
        out = acc / l_i[:, None]
        out_offs = seq * stride_out_seq + heads[:, None] * stride_out_head + d[None, :]
        tl.store(out_ptr + out_offs, out.to(out_ptr.dtype.element_ty), mask=out_mask)


@triton.jit(do_not_specialize=STEP_VARYING)
def decode_kernel(
    q_ptr,  # [B, H, D]
    k_ptr,  # [num_slots, H_kv, D]
    v_ptr,  # [num_slots, H_kv, D]
    k_scale_ptr,  # [num_slots, H_kv] bfloat16 when QUANT
    v_scale_ptr,
    tables_ptr,  # [B, max_blocks]
    lens_ptr,  # [B]
    out_ptr,  # [B, H, D]
    part_max_ptr,  # [B, H, splits] float32 when SPLIT
    part_sum_ptr,  # [B, H, splits] float32 when SPLIT
    part_acc_ptr,  # [B, H, splits, D] float32 when SPLIT
    score_scale,
    block_size,
    keys_per_split,
    num_heads,
    stride_q_seq,
    stride_q_head,
    stride_out_seq,
    stride_out_head,
    stride_slot,
    stride_head,
    stride_scale_slot,
    stride_table,
    GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_G: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr,
    SPLIT: tl.constexpr,
    QUANT: tl.constexpr,
    COMPUTE: tl.constexpr,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
    HEADS_FIRST: tl.constexpr,
):
    if HEADS_FIRST:
        kv_head = tl.program_id(0)
        seq = tl.program_id(1)
    else:
        seq = tl.program_id(0)
        kv_head = tl.program_id(1)
    split = tl.program_id(2)
    context = tl.load(lens_ptr + seq).to(tl.int32)
    start = split * keys_per_split
    end = tl.minimum(context, start + keys_per_split)

    g = tl.arange(0, BLOCK_G)
    d = tl.arange(0, BLOCK_D)
    n = tl.arange(0, BLOCK_N)
    heads = kv_head * GROUP + g  # [BLOCK_G] query heads of this KV head
    g_mask = g < GROUP
    d_mask = d < HEAD_DIM
    q_offs = seq * stride_q_seq + heads[:, None] * stride_q_head + d[None, :]
    q_mask = g_mask[:, None] & d_mask[None, :]
    q = tl.load(q_ptr + q_offs, mask=q_mask, other=0.0)  # [BLOCK_G, BLOCK_D]

    m_i = tl.full([BLOCK_G], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_G], dtype=tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], dtype=tl.float32)
    table_ptr = tables_ptr + seq.to(tl.int64) * stride_table
    for tile in range(start, end, BLOCK_N):
        pos = tile + n  # [BLOCK_N]
        key_mask = pos < end
        slots = key_rows(table_ptr, pos, block_size, key_mask)
        allowed = tl.broadcast_to(key_mask[None, :], (BLOCK_G, BLOCK_N))
        m_i, l_i, acc = attend_tile(
            q, m_i, l_i, acc, k_ptr, v_ptr, k_scale_ptr, v_scale_ptr, slots, key_mask,
            allowed, kv_head, d, d_mask, score_scale, stride_slot, stride_head,
            stride_scale_slot, QUANT, COMPUTE, UPCAST, PRECISION, BLOCK_G, BLOCK_N,
        )  # fmt: skip

    _finish(
        out_ptr, part_max_ptr, part_sum_ptr, part_acc_ptr, m_i, l_i, acc, seq, heads, split,
        tl.num_programs(2), num_heads, stride_out_seq, stride_out_head, d, g_mask, q_mask,
        HEAD_DIM, SPLIT,
    )  # fmt: skip


@triton.jit(do_not_specialize=STEP_VARYING)
def decode_packed_kernel(
    q_ptr,  # [B, H, D]
    k_ptr,  # [num_slots, H_kv, D]
    v_ptr,  # [num_slots, H_kv, D]
    tables_ptr,  # [B, max_blocks]
    lens_ptr,  # [B]
    out_ptr,  # [B, H, D]
    part_max_ptr,  # [B, H, splits] float32 when SPLIT
    part_sum_ptr,  # [B, H, splits] float32 when SPLIT
    part_acc_ptr,  # [B, H, splits, D] float32 when SPLIT
    score_scale,
    block_size,
    keys_per_split,
    num_heads,
    stride_q_seq,
    stride_q_head,
    stride_out_seq,
    stride_out_head,
    stride_slot,
    stride_head,
    stride_table,
    GROUP: tl.constexpr,
    KV_HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr,
    SPLIT: tl.constexpr,
    COMPUTE: tl.constexpr,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
):
    seq = tl.program_id(0)
    split = tl.program_id(1)
    context = tl.load(lens_ptr + seq).to(tl.int32)
    start = split * keys_per_split
    end = tl.minimum(context, start + keys_per_split)

    h = tl.arange(0, BLOCK_H)  # query heads
    d = tl.arange(0, BLOCK_D)
    r = tl.arange(0, BLOCK_N * KV_HEADS)  # tile rows: key r // KV_HEADS, KV head r % KV_HEADS
    row_key = r // KV_HEADS
    row_head = r % KV_HEADS
    h_mask = h < num_heads
    d_mask = d < HEAD_DIM
    q_offs = seq * stride_q_seq + h[:, None] * stride_q_head + d[None, :]
    q_mask = h_mask[:, None] & d_mask[None, :]
    q = tl.load(q_ptr + q_offs, mask=q_mask, other=0.0)  # [BLOCK_H, BLOCK_D]
    # a query head scores the rows of its own KV head; padding heads score every row, so
    # that their (discarded) softmax stays finite
    own = ((h[:, None] // GROUP) == row_head[None, :]) | (~h_mask)[:, None]  # [BLOCK_H, R]

    m_i = tl.full([BLOCK_H], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_H], dtype=tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_D], dtype=tl.float32)
    table_ptr = tables_ptr + seq.to(tl.int64) * stride_table
    for tile in range(start, end, BLOCK_N):
        pos = tile + row_key  # [R]
        key_mask = pos < end
        slots = key_rows(table_ptr, pos, block_size, key_mask)
        offs = slots[:, None] * stride_slot + row_head[:, None] * stride_head + d[None, :]
        tile_mask = key_mask[:, None] & d_mask[None, :]
        k = tl.load(k_ptr + offs, mask=tile_mask, other=0.0)  # [R, BLOCK_D]
        zero = tl.zeros([BLOCK_H, BLOCK_N * KV_HEADS], dtype=tl.float32)
        s = mma(q, tl.trans(k), zero, COMPUTE, UPCAST, PRECISION)  # [BLOCK_H, R]
        s = tl.where(own & key_mask[None, :], s * score_scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.math.exp2(m_i - m_new)
        p = tl.math.exp2(s - m_new[:, None])  # [BLOCK_H, R]
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = tl.load(v_ptr + offs, mask=tile_mask, other=0.0)  # [R, BLOCK_D]
        acc = mma(p, v, acc * alpha[:, None], COMPUTE, UPCAST, PRECISION)
        m_i = m_new

    _finish(
        out_ptr, part_max_ptr, part_sum_ptr, part_acc_ptr, m_i, l_i, acc, seq, h, split,
        tl.num_programs(1), num_heads, stride_out_seq, stride_out_head, d, h_mask, q_mask,
        HEAD_DIM, SPLIT,
    )  # fmt: skip


@triton.jit
def decode_reduce_kernel(
    part_max_ptr,  # [B, H, splits] float32
    part_sum_ptr,  # [B, H, splits] float32
    part_acc_ptr,  # [B, H, splits, D] float32
    out_ptr,  # [B, H, D]
    num_heads,
    num_splits,
    stride_out_seq,
    stride_out_head,
    HEAD_DIM: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    seq = tl.program_id(0)
    head = tl.program_id(1)
    s = tl.arange(0, BLOCK_S)
    d = tl.arange(0, BLOCK_D)
    s_mask = s < num_splits
    d_mask = d < HEAD_DIM
    row = (seq * num_heads + head) * num_splits + s  # [BLOCK_S]
    # a split past the end of the context holds max -inf and sum 0: its weight is 0
    part_max = tl.load(part_max_ptr + row, mask=s_mask, other=float("-inf"))
    part_sum = tl.load(part_sum_ptr + row, mask=s_mask, other=0.0)
    acc_mask = s_mask[:, None] & d_mask[None, :]
    part_acc = tl.load(
        part_acc_ptr + row[:, None] * HEAD_DIM + d[None, :], mask=acc_mask, other=0.0
    )
    weight = tl.math.exp2(part_max - tl.max(part_max, axis=0))  # [BLOCK_S]
    total = tl.sum(weight * part_sum, axis=0)
    out = tl.sum(weight[:, None] * part_acc, axis=0) / total  # [BLOCK_D]
    out_offs = seq * stride_out_seq + head * stride_out_head + d
    tl.store(out_ptr + out_offs, out.to(out_ptr.dtype.element_ty), mask=d_mask)
