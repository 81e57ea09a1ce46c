"""The launchers' argument checks (shapes, dtypes, devices, on the host), and what their
kernels are built with: the compute dtype's products and the padded head dim.

Values on the device are not checked (that would synchronize): lengths must be at least 1
and fit their block table rows, and every block id they reach must be a block of the cache.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction

from auto_glm.kernels.triton.decode import decode_kernel

__all__ = [
    "INTERPRETED",
    "MAX_HEAD_DIM",
    "check_attention",
    "check_index",
    "dot_options",
    "padded_head_dim",
    "scale_stride",
]

MAX_HEAD_DIM = 256
_COMPUTE_DTYPES = {
    torch.float32: tl.float32,
    torch.bfloat16: tl.bfloat16,
    torch.float16: tl.float16,
}
_QUANT_DTYPES = tuple(
    dtype for dtype in (torch.int8, getattr(torch, "float8_e4m3fn", None)) if dtype is not None
)
_INDEX_DTYPES = (torch.int32, torch.int64)
# the kernels were decorated in triton's interpreter (TRITON_INTERPRET=1 at import)
INTERPRETED = isinstance(decode_kernel, InterpretedFunction)


def check_attention(
    name: str,
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_size: int,
    out: torch.Tensor,
    k_scale: torch.Tensor | None,
    v_scale: torch.Tensor | None,
) -> bool:
    """Refuse queries, caches and scales the kernels cannot read; True for a quantized cache."""
    if q.dtype not in _COMPUTE_DTYPES:
        raise TypeError(f"{name} supports float32, bfloat16 and float16 queries, got {q.dtype}")
    if q.dim() != 3 or out.shape != q.shape or out.dtype != q.dtype:
        raise ValueError(
            f"{name}: q and out must be [tokens, heads, head_dim] of one shape and dtype, got "
            f"q {tuple(q.shape)} {q.dtype} and out {tuple(out.shape)} {out.dtype}"
        )
    if q.stride(2) != 1 or out.stride(2) != 1:
        raise ValueError(f"{name}: q and out need a contiguous last dim")
    if k_cache.dim() != 3 or k_cache.shape != v_cache.shape:
        raise ValueError(
            f"{name}: k_cache and v_cache must be [num_slots, kv_heads, head_dim] of one shape, "
            f"got {tuple(k_cache.shape)} and {tuple(v_cache.shape)}"
        )
    if not (k_cache.is_contiguous() and v_cache.is_contiguous()):
        raise ValueError(f"{name}: the caches must be contiguous")
    heads, head_dim = q.shape[1], q.shape[2]
    kv_heads = k_cache.shape[1]
    if kv_heads == 0 or heads % kv_heads or k_cache.shape[2] != head_dim:
        raise ValueError(
            f"{name}: {heads} query heads of dim {head_dim} do not fit a cache of {kv_heads} KV "
            f"heads of dim {k_cache.shape[2]} (heads must be a multiple of the KV heads)"
        )
    if not 1 <= head_dim <= MAX_HEAD_DIM:
        raise ValueError(f"{name}: head_dim={head_dim} is outside 1..{MAX_HEAD_DIM}")
    if block_size < 1 or k_cache.shape[0] % block_size:
        raise ValueError(
            f"{name}: block_size={block_size} must be positive and divide the cache's "
            f"{k_cache.shape[0]} slots"
        )
    tensors = {"q": q, "out": out, "k_cache": k_cache, "v_cache": v_cache}
    _check_device(name, tensors | {"k_scale": k_scale, "v_scale": v_scale}, q.device)
    return _check_cache_dtype(name, q, k_cache, v_cache, k_scale, v_scale)


def _check_cache_dtype(
    name: str,
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    k_scale: torch.Tensor | None,
    v_scale: torch.Tensor | None,
) -> bool:
    """The caches hold q's dtype without scales, or int8 / float8_e4m3fn with bfloat16
    scales [num_slots, H_kv]; True for the latter."""
    if k_cache.dtype != v_cache.dtype:
        raise TypeError(f"{name}: k_cache and v_cache must share one dtype")
    if k_cache.dtype not in _QUANT_DTYPES:
        if k_cache.dtype != q.dtype:
            raise TypeError(
                f"{name}: the caches ({k_cache.dtype}) must hold q's dtype ({q.dtype}), or be "
                "int8 or float8_e4m3fn with k_scale and v_scale"
            )
        if k_scale is not None or v_scale is not None:
            raise ValueError(
                f"{name}: k_scale and v_scale go with an int8 or float8_e4m3fn cache, "
                f"not a {k_cache.dtype} one"
            )
        return False
    kv_heads = k_cache.shape[1]
    strides = {(kv_heads, 1), (0, 1)}  # per slot, or static: one [H_kv] row for every slot
    for scales in (k_scale, v_scale):
        if (
            scales is None
            or scales.dtype != torch.bfloat16
            or scales.shape != k_cache.shape[:2]
            or scales.stride() not in strides
            or scales.stride() != k_scale.stride()
        ):
            raise ValueError(
                f"{name}: a {k_cache.dtype} cache needs k_scale and v_scale: bfloat16 "
                f"[num_slots, kv_heads] = {tuple(k_cache.shape[:2])} tensors, both contiguous "
                "or both static (slot stride 0)"
            )
    return True


def scale_stride(k_scale: torch.Tensor | None, quant: bool) -> int:
    """Elements between consecutive slots' scales: H_kv, or 0 for static scales."""
    return k_scale.stride(0) if quant and k_scale is not None else 0


def check_index(
    name: str,
    what: str,
    index: torch.Tensor,
    shape: tuple[int | None, ...],
    device: torch.device,
) -> None:
    """An int32 / int64 tensor of ``shape`` (None: any size) with a contiguous last dim."""
    fits = index.dim() == len(shape) and all(
        want is None or got == want for got, want in zip(index.shape, shape, strict=True)
    )
    if index.dtype not in _INDEX_DTYPES or not fits or (index.numel() and index.stride(-1) != 1):
        wanted = ", ".join("*" if size is None else str(size) for size in shape)
        raise ValueError(
            f"{name}: {what} must be an int32 or int64 [{wanted}] tensor with a contiguous last "
            f"dim, got {index.dtype} {tuple(index.shape)}"
        )
    _check_device(name, {what: index}, device)


def _check_device(name: str, tensors: dict[str, torch.Tensor | None], device: torch.device) -> None:
    """Every tensor on ``device``; CPU tensors only in triton's interpreter."""
    for what, tensor in tensors.items():
        if tensor is not None and tensor.device != device:
            raise ValueError(f"{name}: {what} is on {tensor.device}, q on {device}")
    if device.type == "cpu" and not INTERPRETED:
        raise RuntimeError(
            f"{name}: CPU tensors run only in triton's interpreter; set TRITON_INTERPRET=1 "
            "before auto_glm.kernels.triton is first used (the GPU backend needs CUDA tensors)"
        )


def padded_head_dim(head_dim: int) -> int:
    """The padded head dim of a tile: a power of two, at least 16 (tl.dot's minimum)."""
    return max(16, triton.next_power_of_2(head_dim))


def dot_options(dtype: torch.dtype) -> dict[str, object]:
    """Constexprs of the kernels' matrix products for queries of ``dtype``: exact float32
    products for float32 (no TF32) and in the interpreter, whose bfloat16 products are
    wrong, so it multiplies in float32 what it rounded to ``dtype``."""
    exact = dtype == torch.float32 or INTERPRETED
    return {
        "COMPUTE": _COMPUTE_DTYPES[dtype],
        "UPCAST": INTERPRETED,
        "PRECISION": "ieee" if exact else "tf32",
    }
