"""Triton kernel that writes a step's new K and V into the paged cache in one launch, where
torch launches an ``index_copy_`` for each.

K and V are the strided views of one q|k|v projection that the attention layer has, ``[T,
H_kv, D]``; the caches are ``[num_slots, H_kv, D]`` of the same dtype (a quantized cache
keeps the layer's torch path, which computes scales). A slot outside the cache is not
written: the engine never hands one, and the kernel does not trust that it never will.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["write_kv"]


@triton.jit
def _write_kv_kernel(
    k_ptr, v_ptr, k_cache_ptr, v_cache_ptr, slots_ptr, num_slots, k_token_stride,
    k_head_stride, v_token_stride, v_head_stride, cache_slot_stride, cache_head_stride,
    head_dim, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """One KV head of one token: its K and V rows copied to its slot."""
    token = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    d = tl.arange(0, BLOCK_D)
    slot = tl.load(slots_ptr + token + d * 0).to(tl.int64)  # [BLOCK_D], all the same slot
    mask = (d < head_dim) & (slot >= 0) & (slot < num_slots)
    k = tl.load(k_ptr + token * k_token_stride + head * k_head_stride + d, mask=mask)
    v = tl.load(v_ptr + token * v_token_stride + head * v_head_stride + d, mask=mask)
    dst = slot * cache_slot_stride + head * cache_head_stride + d
    tl.store(k_cache_ptr + dst, k, mask=mask)
    tl.store(v_cache_ptr + dst, v, mask=mask)


def write_kv(
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slots: torch.Tensor,
) -> None:
    """``k_cache[slots] = k`` and ``v_cache[slots] = v`` for k, v ``[T, H_kv, D]`` (unit
    stride in their last dim), caches ``[num_slots, H_kv, D]`` alike, ``slots`` ``[T]``."""
    for name, x in (("k", k), ("v", v)):
        if x.dim() != 3 or x.stride(-1) != 1 or x.shape != k.shape:
            raise ValueError(
                f"write_kv: {name} must be [T, H_kv, D] with unit stride in its last dim, "
                f"shaped like k {tuple(k.shape)}; got {tuple(x.shape)}"
            )
    for name, cache in (("k_cache", k_cache), ("v_cache", v_cache)):
        if cache.shape[1:] != k.shape[1:] or cache.dtype != k.dtype:
            raise ValueError(
                f"write_kv: {name} must be [num_slots, {k.shape[1]}, {k.shape[2]}] {k.dtype}, "
                f"got {tuple(cache.shape)} {cache.dtype}"
            )
    if k_cache.stride() != v_cache.stride() or k_cache.stride(-1) != 1:
        raise ValueError("write_kv: k_cache and v_cache must be laid out alike, unit stride last")
    if slots.shape != (k.shape[0],) or slots.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"write_kv: slots must be [{k.shape[0]}] int32 or int64")
    if k.shape[0] == 0:
        return
    _write_kv_kernel[(k.shape[0], k.shape[1])](
        k, v, k_cache, v_cache, slots, k_cache.shape[0], k.stride(0), k.stride(1), v.stride(0),
        v.stride(1), k_cache.stride(0), k_cache.stride(1), k.shape[2],
        BLOCK_D=triton.next_power_of_2(k.shape[2]), num_warps=1,
    )  # fmt: skip
