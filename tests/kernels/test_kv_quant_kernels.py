"""Quantized KV cache (kv_cache_dtype int8 / fp8_e4m3): the quantizer, and decode and prefill
attention over it (native kernel and torch paths) against a float64 reference computed from
the dequantized cache."""

from __future__ import annotations

import pytest
import torch

from auto_glm.engine.config import EngineConfig
from auto_glm.kernels import DECODE_HEAD_DIMS
from auto_glm.layers import kv_quant
from auto_glm.layers.attention import (
    Attention,
    AttentionMetadata,
    PrefillChunk,
    attention_metadata,
)
from auto_glm.layers.attention_backends.torch_sdpa import gather_kv
from auto_glm.layers.kv_quant import dequantize_kv, quantize_kv
from tests.kernels.test_paged_attention import _paged_case, _reference, torch_decode

FP8 = torch.float8_e4m3fn
STORAGE = pytest.mark.parametrize("storage", [torch.int8, FP8], ids=["int8", "fp8"])
F32_TOL = {"atol": 2e-5, "rtol": 1e-4}
BF16_TOL = {"atol": 2e-2, "rtol": 2e-2}


def _quantized_case(head_dim, group, kv_heads, block_size, lens, storage, dtype, seed=0):
    """A paged case whose caches are quantized; the float64 caches are their dequantized
    values, the reference's input."""
    q, kc, vc, tables, lens_t, rows = _paged_case(
        head_dim, group, kv_heads, block_size, lens, torch.float32, seed
    )
    kq, ks = quantize_kv(kc * 3, storage)  # [slots, H_kv, D], [slots, H_kv]
    vq, vs = quantize_kv(vc, storage)
    exact = dequantize_kv(kq, ks, torch.float64), dequantize_kv(vq, vs, torch.float64)
    return q.to(dtype), (kq, vq, ks, vs), exact, tables, lens_t, rows


@STORAGE
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_quantize_kv_error_is_within_half_a_step(storage, dtype):
    x = (torch.randn(50, 3, 64) * torch.rand(50, 3, 1) * 10).to(dtype)  # [T, H_kv, D]
    x[0, 1] = 0
    values, scales = quantize_kv(x, storage)
    assert values.dtype == storage and scales.dtype == torch.bfloat16
    assert values.shape == x.shape and scales.shape == x.shape[:2]
    back = dequantize_kv(values, scales, torch.float64)
    err = (back - x.double()).abs()
    step = scales.double().unsqueeze(-1)  # [T, H_kv, 1]
    if storage == torch.int8:  # half a step (and float32's rounding of x / scale)
        bound = step * (0.5 + 1e-5)
    else:  # 3 mantissa bits: half a unit in the last place, at least the subnormal step
        bound = torch.maximum(x.double().abs() * 2**-4, step * 2**-10)
    assert bool((err <= bound).all())
    assert bool((back[0, 1] == 0).all())


@STORAGE
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_a_non_finite_value_makes_its_head_non_finite_and_its_values_zero(storage, bad):
    x = torch.randn(4, 2, 32)  # [T, H_kv, D]
    x[2, 1, 5] = bad
    values, scales = quantize_kv(x, storage)
    assert not bool(scales[2, 1].isfinite())
    assert bool((values[2, 1].float() == 0).all())
    finite = torch.ones(4, 2, dtype=torch.bool)
    finite[2, 1] = False
    assert bool(scales.isfinite().eq(finite).all())
    assert not bool(dequantize_kv(values, scales, torch.float32)[2, 1].isfinite().any())


@STORAGE
@pytest.mark.parametrize("head_dim", DECODE_HEAD_DIMS)
def test_kernel_matches_reference_for_every_head_dim(kernels, storage, head_dim):
    lens = [1, 15, 16, 17, 33, 100]
    q, (kq, vq, ks, vs), (k64, v64), tables, lens_t, rows = _quantized_case(
        head_dim, 3, 2, 16, lens, storage, torch.float32
    )
    out = torch.full_like(q, float("nan"))
    kernels.paged_decode_attention(q, kq, vq, tables, lens_t, 16, head_dim**-0.5, out, ks, vs)
    expected = _reference(q, k64, v64, rows, lens, 16, head_dim**-0.5)
    torch.testing.assert_close(out.double(), expected, **F32_TOL)


@STORAGE
@pytest.mark.parametrize(("group", "kv_heads", "block_size"), [(1, 4, 16), (6, 2, 8), (4, 1, 32)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernel_and_torch_path_over_groups_and_block_sizes(
    kernels, storage, group, kv_heads, block_size, dtype
):
    lens = [1, 7, 8, 9, 31, 32, 33, 64, 129]
    q, (kq, vq, ks, vs), (k64, v64), tables, lens_t, rows = _quantized_case(
        64, group, kv_heads, block_size, lens, storage, dtype, seed=1
    )
    expected = _reference(q, k64, v64, rows, lens, block_size, 0.125)
    tol = F32_TOL if dtype == torch.float32 else BF16_TOL
    out = torch.empty_like(q)
    kernels.paged_decode_attention(q, kq, vq, tables, lens_t, block_size, 0.125, out, ks, vs)
    torch.testing.assert_close(out.double(), expected, **tol)
    attn = Attention(group * kv_heads, kv_heads, 64, 0.125)
    attn.k_cache, attn.v_cache, attn.k_scale, attn.v_scale = kq, vq, ks, vs
    md = AttentionMetadata(
        slot_mapping=torch.empty(0, dtype=torch.long),
        num_decodes=len(lens),
        block_size=block_size,
        decode_block_tables=tables,
        decode_context_lens=lens_t,
    )
    torch.testing.assert_close(torch_decode(attn, q, md).double(), expected, **tol)


def test_every_fp8_value_reads_as_torch_converts_it(kernels):
    """One slot whose 256 values are the 256 float8_e4m3fn bit patterns (NaN included), with
    scale 1: attending to it alone returns them as the kernel converted them."""
    v = torch.arange(256, dtype=torch.uint8).view(FP8).view(1, 1, 256)  # [slots, H_kv, D]
    v = torch.cat([v, torch.zeros(15, 1, 256, dtype=FP8)])  # one block of 16 slots
    ones = torch.ones(16, 1, dtype=torch.bfloat16)  # [slots, H_kv]
    q = torch.randn(1, 1, 256)
    out = torch.empty_like(q)
    tables, lens = torch.zeros(1, 1, dtype=torch.long), torch.ones(1, dtype=torch.long)
    k = torch.zeros_like(v)
    kernels.paged_decode_attention(q, k, v, tables, lens, 16, 1.0, out, ones, ones)
    torch.testing.assert_close(out[0, 0], v[0, 0].float(), atol=0, rtol=0, equal_nan=True)


def decode_quantized(kernels, kernel, q, caches, tables, lens_t, block_size, scale):
    """Decode attention over a quantized cache (``caches``: values K, V and scales K, V)
    with the native kernel (``kernel``) or the torch path; q [B, H, D] -> [B, H, D]."""
    kq, vq, ks, vs = caches
    if kernel:
        out = torch.empty_like(q)
        kernels.paged_decode_attention(q, kq, vq, tables, lens_t, block_size, scale, out, ks, vs)
        return out
    attn = Attention(q.shape[1], kq.shape[1], q.shape[2], scale)
    attn.k_cache, attn.v_cache, attn.k_scale, attn.v_scale = kq, vq, ks, vs
    md = AttentionMetadata(torch.empty(0, dtype=torch.long), q.shape[0], block_size, tables, lens_t)
    return torch_decode(attn, q, md)


@STORAGE
@pytest.mark.parametrize("kernel", [True, False], ids=["cpu-kernel", "torch"])
def test_non_finite_scale_poisons_only_its_heads(kernels, storage, kernel):
    """A NaN K scale of KV head 0 in the second sequence's context makes the output of that
    head's query heads NaN; the other heads and sequences are as the reference has them. The
    kernel does not read a NaN V scale past the sequence's length (in its last block); the
    torch path reads whole blocks, which is why the engine scrubs them."""
    lens = [9, 21, 40]
    q, (kq, vq, ks, vs), _, tables, lens_t, rows = _quantized_case(
        64, 3, 2, 16, lens, storage, torch.float32, seed=5
    )
    ks[rows[1][0] * 16 + 4, 0] = float("nan")
    if kernel:
        vs[rows[1][1] * 16 + 8, 1] = float("nan")  # past the end of its 21 tokens
    out = decode_quantized(kernels, kernel, q, (kq, vq, ks, vs), tables, lens_t, 16, 0.125)
    k64, v64 = dequantize_kv(kq, ks, torch.float64), dequantize_kv(vq, vs, torch.float64)
    expected = _reference(q, k64, v64, rows, lens, 16, 0.125)
    assert not bool(expected[1, :3].isfinite().any()) and bool(expected[1, 3:].isfinite().all())
    torch.testing.assert_close(out.double(), expected, equal_nan=True, **F32_TOL)


@STORAGE
def test_prefill_through_the_quantized_cache(storage):
    """A chunk after 37 cached tokens is written quantized, then attends to the dequantized
    context and itself, causally."""
    torch.manual_seed(7)
    heads, kv_heads, d, ctx, new = 8, 2, 32, 37, 11
    attn = Attention(heads, kv_heads, d, d**-0.5)
    attn.allocate_cache(64, torch.float32, "int8" if storage == torch.int8 else "fp8_e4m3")
    slots = torch.randperm(64)[: ctx + new]
    past_k, past_v = torch.randn(ctx, kv_heads, d), torch.randn(ctx, kv_heads, d)
    attn._write(slots[:ctx], past_k, past_v)
    q = torch.randn(new, heads, d)
    k, v = torch.randn(new, kv_heads, d), torch.randn(new, kv_heads, d)
    mask = torch.ones(new, ctx + new, dtype=torch.bool).tril(ctx)  # bottom-right causal
    md = AttentionMetadata(slots[ctx:], prefills=[PrefillChunk(0, new, slots, mask)])
    with attention_metadata(md):
        out = attn(q, k, v).view(new, heads, d)
    keys = gather_kv(attn.k_cache, attn.k_scale, slots, torch.float64)  # [n, H_kv, D]
    values = gather_kv(attn.v_cache, attn.v_scale, slots, torch.float64)
    keys, values = keys.repeat_interleave(4, 1), values.repeat_interleave(4, 1)  # [n, H, D]
    scores = torch.einsum("qhd,nhd->hqn", q.double() * d**-0.5, keys)
    weights = scores.masked_fill(~mask, float("-inf")).softmax(-1)
    expected = torch.einsum("hqn,nhd->qhd", weights, values)
    torch.testing.assert_close(out.double(), expected, **F32_TOL)
    # and what was written is the quantized new K/V
    kq, ks = quantize_kv(k, storage)
    assert bool((attn.k_cache.index_select(0, slots[ctx:]).float() == kq.float()).all())
    assert bool((attn.k_scale.index_select(0, slots[ctx:]) == ks).all())


def test_kernel_refuses_missing_or_stray_scales(kernels):
    q, (kq, vq, ks, vs), _, tables, lens_t, _ = _quantized_case(
        64, 2, 2, 16, [5], torch.int8, torch.float32
    )
    out = torch.empty_like(q)
    with pytest.raises(RuntimeError, match="cache needs k_scale and v_scale"):
        kernels.paged_decode_attention(q, kq, vq, tables, lens_t, 16, 0.1, out)
    with pytest.raises(RuntimeError, match="cache needs k_scale and v_scale"):
        kernels.paged_decode_attention(q, kq, vq, tables, lens_t, 16, 0.1, out, ks.float(), vs)
    with pytest.raises(RuntimeError, match="k_scale and v_scale go with an int8"):
        kernels.paged_decode_attention(q, q.new_zeros(kq.shape), q.new_zeros(kq.shape), tables,
                                       lens_t, 16, 0.1, out, ks, vs)  # fmt: skip


def test_bytes_per_slot_and_the_settings_errors(monkeypatch):
    assert kv_quant.kv_bytes_per_slot("auto", torch.bfloat16, 64) == 128
    assert kv_quant.kv_bytes_per_slot("int8", torch.bfloat16, 64) == 66
    assert kv_quant.kv_bytes_per_slot("fp8_e4m3", torch.float32, 128) == 130
    with pytest.raises(ValueError, match=r"kv_cache_dtype='fp16' is not .* auto, int8, fp8_e4m3"):
        EngineConfig(kv_cache_dtype="fp16")
    monkeypatch.setattr(kv_quant, "_FP8", None)
    with pytest.raises(ValueError, match=r"needs torch.float8_e4m3fn, which torch .* lacks"):
        EngineConfig(kv_cache_dtype="fp8_e4m3")
