"""Fused elementwise Triton kernels for the GPU: RMSNorm (with the residual add),
SiLU-and-multiply and the rotary embedding of q and k (with Qwen3's norms of each head of q
and k before it, in the same launch), one launch each where torch launches four to eight
per call (upcast, square, mean, rsqrt, multiply, round, scale; silu, multiply; four
products, two sums, a concatenation and a copy per tensor).

The first two take the same arguments as the native CPU kernels (``auto_glm.kernels``), so
that :class:`~auto_glm.layers.norm.RMSNorm` and :class:`~auto_glm.layers.linear.SiluAndMul`
call either through one interface. Rounding follows the reference models step by step: the
residual sum and the normalised value are rounded to the model dtype before the weight is
applied, ``silu(gate)`` is rounded before it multiplies ``up``, and each rotary product is
rounded before the sum; square root and divisions are IEEE round-to-nearest. Sums run in
float32 in a different order than torch's, so the engine uses them for half-precision
models only (float32 ones stay token-exact with transformers on torch's kernels).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction

__all__ = ["FUSED_DTYPES", "ROTARY_LAUNCH", "add_rms_norm", "rms_norm", "rotary", "silu_and_mul"]

FUSED_DTYPES = (torch.bfloat16, torch.float16)
# No FMA contraction in the rotary: compiled for sm_90, ``x1 * cos - x2 * sin`` rounded per
# product would become one bfloat16 ``fma`` (one rounding), 1 ulp off torch's rotation in
# about 1 % of elements (seen on an H200, 2026-11-29)
ROTARY_LAUNCH = {"num_warps": 1, "enable_fp_fusion": False}
_SILU_BLOCK = 1024  # columns of one SiLU program


@triton.jit
def _round(x, DTYPE: tl.constexpr, BITWISE: tl.constexpr):
    """float32 ``x`` rounded to DTYPE, to nearest even. BITWISE rounds to bfloat16 on the
    bits, for triton's interpreter, which truncates instead."""
    if BITWISE:
        bits = x.to(tl.uint32, bitcast=True)
        bits = bits + 0x7FFF + ((bits >> 16) & 1)
        rounded = (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
        return tl.where(x != x, x.to(tl.bfloat16), rounded)  # NaN stays NaN
    return x.to(DTYPE)


@triton.jit
def _rms_norm_kernel(
    x_ptr, res_ptr, w_ptr, out_ptr, x_stride, width, eps,
    ADD: tl.constexpr, BITWISE: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    dtype = out_ptr.dtype.element_ty
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < width
    x = tl.load(x_ptr + row * x_stride + cols, mask=mask, other=0.0).to(tl.float32)  # [BLOCK]
    if ADD:
        res = tl.load(res_ptr + row * width + cols, mask=mask, other=0.0).to(tl.float32)
        summed = _round(x + res, dtype, BITWISE)
        tl.store(res_ptr + row * width + cols, summed, mask=mask)
        x = summed.to(tl.float32)
    inv = tl.div_rn(1.0, tl.sqrt_rn(tl.sum(x * x, axis=0) / width + eps))
    normed = _round(x * inv, dtype, BITWISE).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * width + cols, _round(w * normed, dtype, BITWISE), mask=mask)


@triton.jit
def _silu_and_mul_kernel(
    x_ptr, out_ptr, x_stride, width, BITWISE: tl.constexpr, BLOCK: tl.constexpr
):
    dtype = out_ptr.dtype.element_ty
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < width
    gate = tl.load(x_ptr + row * x_stride + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(x_ptr + row * x_stride + width + cols, mask=mask, other=0.0).to(tl.float32)
    silu = _round(tl.div_rn(gate, 1.0 + tl.exp(-gate)), dtype, BITWISE).to(tl.float32)
    tl.store(out_ptr + row * width + cols, _round(silu * up, dtype, BITWISE), mask=mask)


@triton.jit
def _rotary_kernel(
    q_ptr, k_ptr, cos_ptr, sin_ptr, q_weight_ptr, k_weight_ptr, eps, q_token_stride,
    q_head_stride, k_token_stride, k_head_stride, cos_stride, num_q_heads, head_dim,
    HALF: tl.constexpr, BLOCK: tl.constexpr, BLOCK_D: tl.constexpr, INTERLEAVED: tl.constexpr,
    NORM: tl.constexpr, BITWISE: tl.constexpr,
):  # fmt: skip
    """One head of one token: its first 2 * HALF dims rotated in place; with NORM the whole
    head is first RMS-normalised with q's or k's weight (Qwen3), in registers."""
    dtype = q_ptr.dtype.element_ty
    token = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    if head < num_q_heads:
        base = q_ptr + token * q_token_stride + head * q_head_stride
        w_ptr = q_weight_ptr
    else:
        base = k_ptr + token * k_token_stride + (head - num_q_heads) * k_head_stride
        w_ptr = k_weight_ptr
    i = tl.arange(0, BLOCK)
    mask = i < HALF
    if INTERLEAVED:  # pairs (0, 1), (2, 3), ...
        first, second = 2 * i, 2 * i + 1
    else:  # pairs (i, i + HALF)
        first, second = i, i + HALF
    x1 = tl.load(base + first, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(base + second, mask=mask, other=0.0).to(tl.float32)
    if NORM:
        d = tl.arange(0, BLOCK_D)
        rest = (d >= 2 * HALF) & (d < head_dim)  # dims past the rotary: normalised only
        x = tl.load(base + d, mask=d < head_dim, other=0.0).to(tl.float32)  # [BLOCK_D]
        inv = tl.div_rn(1.0, tl.sqrt_rn(tl.sum(x * x, axis=0) / head_dim + eps))
        w = tl.load(w_ptr + d, mask=rest, other=0.0).to(tl.float32)
        normed = _round(x * inv, dtype, BITWISE).to(tl.float32)
        tl.store(base + d, _round(w * normed, dtype, BITWISE), mask=rest)
        w1 = tl.load(w_ptr + first, mask=mask, other=0.0).to(tl.float32)
        w2 = tl.load(w_ptr + second, mask=mask, other=0.0).to(tl.float32)
        x1 = _round(w1 * _round(x1 * inv, dtype, BITWISE).to(tl.float32), dtype, BITWISE)
        x2 = _round(w2 * _round(x2 * inv, dtype, BITWISE).to(tl.float32), dtype, BITWISE)
        x1, x2 = x1.to(tl.float32), x2.to(tl.float32)
    cos = tl.load(cos_ptr + token * cos_stride + i, mask=mask, other=0.0).to(tl.float32)
    sin = tl.load(sin_ptr + token * cos_stride + i, mask=mask, other=0.0).to(tl.float32)
    x1_cos = _round(x1 * cos, dtype, BITWISE).to(tl.float32)
    x2_sin = _round(x2 * sin, dtype, BITWISE).to(tl.float32)
    x2_cos = _round(x2 * cos, dtype, BITWISE).to(tl.float32)
    x1_sin = _round(x1 * sin, dtype, BITWISE).to(tl.float32)
    tl.store(base + first, _round(x1_cos - x2_sin, dtype, BITWISE), mask=mask)
    tl.store(base + second, _round(x2_cos + x1_sin, dtype, BITWISE), mask=mask)


# the kernels were decorated in triton's interpreter (TRITON_INTERPRET=1 at import)
_INTERPRETED = isinstance(_rms_norm_kernel, InterpretedFunction)


def _bitwise(x: torch.Tensor) -> bool:
    return _INTERPRETED and x.dtype == torch.bfloat16


def _check(op: str, x: torch.Tensor, out: torch.Tensor, width: int) -> None:
    if x.dim() != 2 or x.stride(1) != 1:
        raise ValueError(f"{op}: x must be [rows, width] with unit stride, got {tuple(x.shape)}")
    if not out.is_contiguous() or out.shape != (x.shape[0], width) or out.dtype != x.dtype:
        raise ValueError(f"{op}: out must be a contiguous [{x.shape[0]}, {width}] {x.dtype} tensor")


def _norm(
    op: str,
    x: torch.Tensor,
    residual: torch.Tensor | None,
    weight: torch.Tensor,
    eps: float,
    out: torch.Tensor,
) -> None:
    width = x.shape[-1]
    _check(op, x, out, width)
    if weight.shape != (width,) or not weight.is_contiguous():
        raise ValueError(f"{op}: weight must be a contiguous [{width}] tensor")
    if residual is not None and (not residual.is_contiguous() or residual.shape != x.shape):
        raise ValueError(f"{op}: residual must be contiguous and shaped like x")
    if x.shape[0] == 0:
        return
    block = triton.next_power_of_2(width)
    _rms_norm_kernel[(x.shape[0],)](
        x, residual if residual is not None else out, weight, out, x.stride(0), width, eps,
        ADD=residual is not None, BITWISE=_bitwise(x), BLOCK=block,
        num_warps=min(max(block // 512, 1), 8),
    )  # fmt: skip


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, out: torch.Tensor) -> None:
    """out [T, C] = weight * rms_normalise(x [T, C])."""
    _norm("rms_norm", x, None, weight, eps, out)


def add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float, out: torch.Tensor
) -> None:
    """residual [T, C] += x (in place), then out [T, C] = weight * rms_normalise(residual)."""
    _norm("add_rms_norm", x, residual, weight, eps, out)


def silu_and_mul(x: torch.Tensor, out: torch.Tensor) -> None:
    """out [T, C] = silu(x[:, :C]) * x[:, C:] for x [T, 2C]."""
    width = x.shape[-1] // 2
    _check("silu_and_mul", x, out, width)
    if x.shape[0] == 0:
        return
    grid = (x.shape[0], triton.cdiv(width, _SILU_BLOCK))
    _silu_and_mul_kernel[grid](
        x, out, x.stride(0), width, BITWISE=_bitwise(x), BLOCK=_SILU_BLOCK, num_warps=4
    )


def rotary(
    q: torch.Tensor,
    k: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    interleaved: bool,
    norms: tuple[torch.Tensor, torch.Tensor, float] | None = None,
) -> None:
    """Rotate q [T, H, D] and k [T, H_kv, D] in place by cos and sin [T, 1, R / 2] (their
    first R dims; the rest pass through), as :class:`~auto_glm.layers.rotary.RotaryEmbedding`
    does. ``norms`` (q's weight [D], k's weight [D], eps) first RMS-normalises each head of
    q and k in place, as Qwen3's ``q_norm`` and ``k_norm`` do, in the same launch."""
    half = cos.shape[-1]
    head_dim = q.shape[-1]
    for name, x in (("q", q), ("k", k)):
        if x.dim() != 3 or x.stride(-1) != 1 or x.shape[0] != q.shape[0] or 2 * half > x.shape[-1]:
            raise ValueError(
                f"rotary: {name} must be [T, heads, head_dim >= {2 * half}] with unit stride in "
                f"its last dim, got {tuple(x.shape)}"
            )
    if cos.shape != sin.shape or cos.stride() != sin.stride() or cos.stride(-1) != 1:
        raise ValueError("rotary: cos and sin must be alike, [T, 1, R / 2], unit stride last")
    if k.dtype != q.dtype or cos.dtype != q.dtype:
        raise ValueError(f"rotary: q, k, cos and sin must share a dtype, q is {q.dtype}")
    q_weight, k_weight, eps = norms if norms is not None else (q, k, 0.0)  # weights unread
    if norms is not None:
        for name, w in (("q", q_weight), ("k", k_weight)):
            if w.shape != (head_dim,) or not w.is_contiguous() or w.dtype != q.dtype:
                raise ValueError(
                    f"rotary: {name}'s norm weight must be a contiguous [{head_dim}] {q.dtype} "
                    f"tensor, like q's heads, got {tuple(w.shape)} {w.dtype}"
                )
        if k.shape[-1] != head_dim:
            raise ValueError("rotary: q and k must share their head_dim to be normalised")
    if q.shape[0] == 0:
        return
    grid = (q.shape[0], q.shape[1] + k.shape[1])
    _rotary_kernel[grid](
        q, k, cos, sin, q_weight, k_weight, eps, q.stride(0), q.stride(1), k.stride(0),
        k.stride(1), cos.stride(0), q.shape[1], head_dim, HALF=half,
        BLOCK=triton.next_power_of_2(half), BLOCK_D=triton.next_power_of_2(head_dim),
        INTERLEAVED=interleaved, NORM=norms is not None, BITWISE=_bitwise(q), **ROTARY_LAUNCH,
    )  # fmt: skip
