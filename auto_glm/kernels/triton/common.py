"""Triton building blocks shared by the decode and prefill kernels: the paged lookup of key
rows, the matrix product rounded to the model's dtype, and one online-softmax step over a
tile of keys.

Scores are kept in base 2 (``scale * log2(e)`` folds into the score scale) so the kernels
use ``exp2``. A quantized cache (int8 or float8_e4m3fn values, bfloat16 scales per
(slot, KV head), or static ones at slot stride 0) folds each key's scale into its scores and
dequantizes V tiles to float32; an int8 -128 (the poison of a non-finite value, see
:mod:`auto_glm.layers.kv_static`) reads as NaN.
"""

from __future__ import annotations

import triton
import triton.language as tl

__all__ = ["STEP_VARYING", "attend_tile", "key_rows", "mma"]

# Integer arguments of the attention kernels that change from step to step, which triton
# would otherwise specialise on (a value of 1, or a multiple of 16), building a variant
# of the kernel for each: the block tables' row stride, the widest table of the step. Left
# unspecialised (a scalar offset to one table row), the warm-up's steps build every variant
# the requests use.
STEP_VARYING = ["stride_table"]


@triton.jit
def _widen(x):
    """Quantized values [BLOCK_N, BLOCK_D] -> float32, an int8 -128 or a float8 NaN as NaN
    (checked on the bits: triton's interpreter converts float8 NaN to 480)."""
    if x.dtype == tl.int8:
        return tl.where(x == -128, float("nan"), x.to(tl.float32))
    nan = (x.to(tl.uint8, bitcast=True) & 0x7F) == 0x7F
    return tl.where(nan, float("nan"), x.to(tl.float32))


@triton.jit
def key_rows(table_ptr, pos, block_size, mask):
    """Cache slots [BLOCK_N] (int64) of key positions ``pos`` [BLOCK_N] of one sequence
    whose block table row starts at ``table_ptr``; masked positions give slot 0."""
    block = tl.load(table_ptr + pos // block_size, mask=mask, other=0).to(tl.int64)
    return block * block_size + pos % block_size


@triton.jit
def mma(a, b, acc, COMPUTE: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    """acc + a @ b with a and b rounded to COMPUTE (the model's dtype) first, as on tensor
    cores. UPCAST multiplies them in float32: triton's interpreter multiplies the raw bits of
    bfloat16 operands, so CPU runs take this path (with the same rounding, hence results)."""
    a = a.to(COMPUTE)
    b = b.to(COMPUTE)
    if UPCAST:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision=PRECISION)


@triton.jit
def attend_tile(
    q,  # [BLOCK_M, BLOCK_D] in COMPUTE
    m_i,  # [BLOCK_M] float32 running max of the base-2 scores
    l_i,  # [BLOCK_M] float32 running sum of exp2(score - m_i)
    acc,  # [BLOCK_M, BLOCK_D] float32 running sum of weights * V
    k_ptr,
    v_ptr,
    k_scale_ptr,
    v_scale_ptr,
    slots,  # [BLOCK_N] int64 cache slots of the tile's keys
    key_mask,  # [BLOCK_N] keys that exist (loads outside it are skipped)
    allowed,  # [BLOCK_M, BLOCK_N] (query, key) pairs that attend
    kv_head,
    d,  # [BLOCK_D] int32 0..BLOCK_D-1
    d_mask,  # [BLOCK_D] d < head_dim
    score_scale,  # softmax scale * log2(e)
    stride_slot,
    stride_head,
    stride_scale_slot,
    QUANT: tl.constexpr,
    COMPUTE: tl.constexpr,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """One online-softmax step of queries ``q`` over a tile of keys; returns the new
    ``(m_i, l_i, acc)``. Every row of ``allowed`` must hold a key in this or an earlier
    tile, so ``m_i`` is finite after the step."""
    offs = slots[:, None] * stride_slot + kv_head * stride_head + d[None, :]  # [BLOCK_N, BLOCK_D]
    tile_mask = key_mask[:, None] & d_mask[None, :]
    k = tl.load(k_ptr + offs, mask=tile_mask, other=0.0)  # [BLOCK_N, BLOCK_D]
    if QUANT:
        k = _widen(k)
    zero = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    s = mma(q, tl.trans(k), zero, COMPUTE, UPCAST, PRECISION)  # [BLOCK_M, BLOCK_N]
    if QUANT:
        scale_offs = slots * stride_scale_slot + kv_head
        k_scale = tl.load(k_scale_ptr + scale_offs, mask=key_mask, other=0.0).to(tl.float32)
        s = s * k_scale[None, :]
    s = tl.where(allowed, s * score_scale, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, axis=1))  # [BLOCK_M]
    alpha = tl.math.exp2(m_i - m_new)
    p = tl.math.exp2(s - m_new[:, None])  # [BLOCK_M, BLOCK_N]
    l_i = l_i * alpha + tl.sum(p, axis=1)
    v = tl.load(v_ptr + offs, mask=tile_mask, other=0.0)  # [BLOCK_N, BLOCK_D]
    if QUANT:
        v_scale = tl.load(v_scale_ptr + scale_offs, mask=key_mask, other=0.0).to(tl.float32)
        v = _widen(v) * v_scale[:, None]
    acc = mma(p, v, acc * alpha[:, None], COMPUTE, UPCAST, PRECISION)
    return m_new, l_i, acc
