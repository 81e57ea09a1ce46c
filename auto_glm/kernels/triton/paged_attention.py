"""Launchers of the Triton paged attention kernels: decode (one query per sequence) and
varlen prefill (all of a step's chunks in one launch), reading K/V in place from caches
``[num_slots, H_kv, D]`` (slot = block_id * block_size + offset) through block tables.

Both take float32, bfloat16 or float16 queries (fp32 accumulation, online softmax), any head
dim up to ``MAX_HEAD_DIM`` (tiles are padded to a power of two and masked), grouped-query
attention (H a multiple of H_kv), int32 or int64 block tables and lengths, and a cache of
the queries' dtype or an int8 / float8_e4m3fn one with bfloat16 scales ``[num_slots, H_kv]``
(:mod:`auto_glm.layers.kv_quant`). Shapes, dtypes and devices are checked on the host;
values on the device are not (that would synchronize): lengths must be at least 1 and fit
their block table rows, and every block id they reach must be a block of the cache.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction

from auto_glm.kernels.triton.decode import (
    decode_kernel,
    decode_packed_kernel,
    decode_reduce_kernel,
)
from auto_glm.kernels.triton.prefill import prefill_kernel
from auto_glm.kernels.triton.tiles import DecodeTiles, tuned_tiles

__all__ = ["MAX_HEAD_DIM", "paged_decode_attention", "paged_prefill_attention"]

MAX_HEAD_DIM = 256
_LOG2E = math.log2(math.e)  # the kernels' softmax runs in base 2 (exp2)
_COMPUTE_DTYPES = {
    torch.float32: tl.float32,
    torch.bfloat16: tl.bfloat16,
    torch.float16: tl.float16,
}
_QUANT_DTYPES = tuple(
    dtype for dtype in (torch.int8, getattr(torch, "float8_e4m3fn", None)) if dtype is not None
)
_INDEX_DTYPES = (torch.int32, torch.int64)
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
# prefill chunks a program scans per step while it looks for its own
_CHUNKS_PER_SCAN = 64
# the kernels were decorated in triton's interpreter (TRITON_INTERPRET=1 at import)
_INTERPRETED = isinstance(decode_kernel, InterpretedFunction)


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
    quant = _check_attention(name, q, k_cache, v_cache, block_size, out, k_scale, v_scale)
    batch, heads, head_dim = q.shape
    _check_index(name, "block_tables", block_tables, (batch, None), q.device)
    _check_index(name, "context_lens", context_lens, (batch,), q.device)
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
    block_d = _block_d(head_dim)
    if splits > 1:
        part_max = torch.empty(batch, heads, splits, dtype=torch.float32, device=q.device)
        part_sum = torch.empty_like(part_max)
        part_acc = torch.empty(batch, heads, splits, head_dim, dtype=torch.float32, device=q.device)
    else:
        part_max = part_sum = part_acc = out  # not written to
    strides = (q.stride(0), q.stride(1), out.stride(0), out.stride(1))
    if tiles.packed_heads:
        decode_packed_kernel[(batch, splits)](
            q, k_cache, v_cache, block_tables, context_lens, out, part_max, part_sum, part_acc,
            scale * _LOG2E, block_size, keys_per_split, heads, *strides,
            k_cache.stride(0), k_cache.stride(1), block_tables.stride(0),
            GROUP=group, KV_HEADS=kv_heads, HEAD_DIM=head_dim,
            BLOCK_H=max(16, triton.next_power_of_2(heads)), BLOCK_D=block_d,
            BLOCK_N=tiles.block_n, SPLIT=splits > 1, num_warps=tiles.num_warps,
            num_stages=tiles.num_stages, **_dot_options(q.dtype),
        )  # fmt: skip
    else:
        scales = (k_scale, v_scale) if quant else (k_cache, v_cache)  # not read unless quant
        grid = (kv_heads, batch, splits) if tiles.heads_first else (batch, kv_heads, splits)
        decode_kernel[grid](
            q, k_cache, v_cache, *scales, block_tables, context_lens, out,
            part_max, part_sum, part_acc, scale * _LOG2E, block_size, keys_per_split, heads,
            *strides, k_cache.stride(0), k_cache.stride(1), _scale_stride(k_scale, quant),
            block_tables.stride(0),
            GROUP=group, HEAD_DIM=head_dim, BLOCK_G=max(16, triton.next_power_of_2(group)),
            BLOCK_D=block_d, BLOCK_N=tiles.block_n, SPLIT=splits > 1, QUANT=quant,
            HEADS_FIRST=tiles.heads_first, num_warps=tiles.num_warps,
            num_stages=tiles.num_stages, **_dot_options(q.dtype),
        )  # fmt: skip
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
    quant = _check_attention(name, q, k_cache, v_cache, block_size, out, k_scale, v_scale)
    tokens, heads, head_dim = q.shape
    num_chunks = seq_lens.shape[0] if seq_lens.dim() == 1 else -1
    _check_index(name, "seq_lens", seq_lens, (num_chunks,), q.device)
    _check_index(name, "query_start_loc", query_start_loc, (num_chunks + 1,), q.device)
    _check_index(name, "block_tables", block_tables, (num_chunks, None), q.device)
    if num_chunks == 0 or tokens == 0:
        return
    kv_heads = k_cache.shape[1]
    block_m, block_n = (64, 64) if head_dim <= 128 else (32, 32)
    scales = (k_scale, v_scale) if quant else (k_cache, v_cache)  # not read unless quant
    prefill_kernel[(tokens // block_m + num_chunks, heads)](
        q, k_cache, v_cache, *scales, query_start_loc, seq_lens, block_tables, out,
        scale * _LOG2E, block_size, num_chunks,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        k_cache.stride(0), k_cache.stride(1), _scale_stride(k_scale, quant), block_tables.stride(0),
        GROUP=heads // kv_heads, HEAD_DIM=head_dim, BLOCK_M=block_m, BLOCK_N=block_n,
        BLOCK_D=_block_d(head_dim), BLOCK_C=_CHUNKS_PER_SCAN, QUANT=quant,
        num_warps=_NUM_WARPS, **_dot_options(q.dtype),
    )  # fmt: skip


def _check_attention(
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


def _scale_stride(k_scale: torch.Tensor | None, quant: bool) -> int:
    """Elements between consecutive slots' scales: H_kv, or 0 for static scales."""
    return k_scale.stride(0) if quant and k_scale is not None else 0


def _check_index(
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
    if device.type == "cpu" and not _INTERPRETED:
        raise RuntimeError(
            f"{name}: CPU tensors run only in triton's interpreter; set TRITON_INTERPRET=1 "
            "before auto_glm.kernels.triton is first used (the GPU backend needs CUDA tensors)"
        )


def _block_d(head_dim: int) -> int:
    """The padded head dim of a tile: a power of two, at least 16 (tl.dot's minimum)."""
    return max(16, triton.next_power_of_2(head_dim))


def _decode_splits(programs: int, capacity: int) -> int:
    """Split-K partitions of decode for ``programs`` per split (sequences x KV heads, or
    sequences with packed heads) over block tables of ``capacity`` keys."""
    if programs >= _BUSY_PROGRAMS:
        return 1
    by_length = triton.cdiv(capacity, _MIN_KEYS_PER_SPLIT)
    return max(1, min(by_length, triton.cdiv(_BUSY_PROGRAMS, programs), _MAX_SPLITS))


def _dot_options(dtype: torch.dtype) -> dict[str, object]:
    """Constexprs of the kernels' matrix products for queries of ``dtype``: exact float32
    products for float32 (no TF32) and in the interpreter, whose bfloat16 products are
    wrong, so it multiplies in float32 what it rounded to ``dtype``."""
    exact = dtype == torch.float32 or _INTERPRETED
    return {
        "COMPUTE": _COMPUTE_DTYPES[dtype],
        "UPCAST": _INTERPRETED,
        "PRECISION": "ieee" if exact else "tf32",
    }
