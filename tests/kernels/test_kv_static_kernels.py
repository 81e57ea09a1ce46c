"""Static KV scales (kv_cache_scales calibrate / checkpoint): the quantizer, its poison for
non-finite values, and decode / prefill attention over a cache whose scales are one per KV
head (an expanded [slots, H_kv] view, slot stride 0), through the native kernel and the
torch path, against a float64 reference computed from the dequantized cache."""

from __future__ import annotations

import pytest
import torch

from auto_glm.layers.attention import Attention, AttentionMetadata, PrefillChunk, attention_metadata
from auto_glm.layers.attention_backends.torch_sdpa import gather_kv
from auto_glm.layers.kv_static import is_poison, quantize_kv_static, static_scale
from tests.kernels.test_kv_quant_kernels import decode_quantized
from tests.kernels.test_paged_attention import _paged_case, _reference, torch_decode

FP8 = torch.float8_e4m3fn
STORAGE = pytest.mark.parametrize("storage", [torch.int8, FP8], ids=["int8", "fp8"])
QMAX = {torch.int8: 127.0, FP8: 448.0}
F32_TOL = {"atol": 2e-5, "rtol": 1e-4}
BF16_TOL = {"atol": 2e-2, "rtol": 2e-2}


def static_case(head_dim, group, kv_heads, block_size, lens, storage, dtype, seed=0):
    """A paged case quantized with one scale per KV head (amax * 1.25 / qmax, K and V apart);
    the float64 caches are the dequantized values, the reference's input."""
    q, kc, vc, tables, lens_t, rows = _paged_case(
        head_dim, group, kv_heads, block_size, lens, torch.float32, seed
    )
    kc = kc * torch.arange(1, kv_heads + 1).view(1, -1, 1)  # heads of different ranges
    out = []
    for x in (kc, vc):
        scale = static_scale(x.abs().amax(dim=(0, 2)), storage, 1.25)  # [H_kv]
        values = quantize_kv_static(x, storage, scale)
        expanded = scale.to(torch.bfloat16).expand(x.shape[:2])  # [slots, H_kv], stride (0, 1)
        out.append((values, expanded, values.double() * scale.double()[:, None]))
    (kq, ks, k64), (vq, vs, v64) = out
    return q.to(dtype), (kq, vq, ks, vs), (k64, v64), tables, lens_t, rows


@STORAGE
def test_static_quantization_error_saturation_and_poison(storage):
    x = torch.randn(40, 3, 64) * torch.tensor([1.0, 5.0, 0.01]).view(1, 3, 1)
    scale = static_scale(x.abs().amax(dim=(0, 2)), storage, 1.25)  # [H_kv]
    assert scale.dtype == torch.float32 and bool((scale == scale.bfloat16().float()).all())
    values = quantize_kv_static(x, storage, scale)
    back = values.double() * scale.double()[:, None]
    step = scale.double()[:, None]
    if storage == torch.int8:
        bound = step * (0.5 + 1e-5)
    else:
        bound = torch.maximum(x.double().abs() * 2**-4, step * 2**-10)
    assert bool(((back - x.double()).abs() <= bound).all())
    assert not bool(is_poison(values).any())
    # beyond the range: saturated at +-qmax; non-finite: poison, never a finite value
    y = x[:4].clone()
    y[0, 0, 0], y[1, 1, 1] = 1e6, -1e6
    y[2, 2, 2], y[3, 0, 3], y[3, 1, 4] = float("nan"), float("inf"), -float("inf")
    q = quantize_kv_static(y, storage, scale)
    assert (
        float(q[0, 0, 0].float()) == QMAX[storage] and float(q[1, 1, 1].float()) == -QMAX[storage]
    )
    poison = torch.zeros(y.shape, dtype=torch.bool)
    poison[2, 2, 2] = poison[3, 0, 3] = poison[3, 1, 4] = True
    assert bool(is_poison(q).eq(poison).all())


@STORAGE
def test_scales_fit_an_all_zero_head(storage):
    scale = static_scale(torch.tensor([0.0, 2.0]), storage, 1.25)
    assert bool((scale > 0).all()) and bool(scale.isfinite().all())
    values = quantize_kv_static(torch.zeros(3, 2, 16), storage, scale)
    assert bool((values.float() == 0).all())


@STORAGE
@pytest.mark.parametrize("head_dim", [32, 64, 128])
@pytest.mark.parametrize(("group", "kv_heads", "block_size"), [(1, 4, 16), (6, 2, 8), (4, 1, 32)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernel_and_torch_path_read_static_scales(
    kernels, storage, head_dim, group, kv_heads, block_size, dtype
):
    lens = [1, 7, 8, 9, 31, 33, 100]
    q, (kq, vq, ks, vs), (k64, v64), tables, lens_t, rows = static_case(
        head_dim, group, kv_heads, block_size, lens, storage, dtype, seed=2
    )
    assert ks.stride() == (0, 1)
    scale = head_dim**-0.5
    expected = _reference(q, k64, v64, rows, lens, block_size, scale)
    tol = F32_TOL if dtype == torch.float32 else BF16_TOL
    out = torch.full_like(q, float("nan"))
    kernels.paged_decode_attention(q, kq, vq, tables, lens_t, block_size, scale, out, ks, vs)
    torch.testing.assert_close(out.double(), expected, **tol)
    attn = Attention(group * kv_heads, kv_heads, head_dim, scale)
    attn.k_cache, attn.v_cache, attn.k_scale, attn.v_scale = kq, vq, ks, vs
    md = AttentionMetadata(torch.empty(0, dtype=torch.long), len(lens), block_size, tables, lens_t)
    torch.testing.assert_close(torch_decode(attn, q, md).double(), expected, **tol)


@STORAGE
@pytest.mark.parametrize("kernel", [True, False], ids=["cpu-kernel", "torch"])
def test_a_poisoned_value_makes_only_its_heads_nan(kernels, storage, kernel):
    lens = [9, 21, 40]
    q, (kq, vq, ks, vs), (k64, v64), tables, lens_t, rows = static_case(
        64, 3, 2, 16, lens, storage, torch.float32, seed=5
    )
    slot = rows[1][0] * 16 + 4
    poison = quantize_kv_static(torch.full((1, 1, 1), float("nan")), storage, ks[0, :1])
    kq.view(torch.uint8)[slot, 0, 7] = poison.view(torch.uint8)[0, 0, 0]
    assert bool(is_poison(kq[slot, 0]).any()) and not bool(is_poison(kq[slot, 1]).any())
    out = decode_quantized(kernels, kernel, q, (kq, vq, ks, vs), tables, lens_t, 16, 0.125)
    k64 = k64.clone()
    k64[slot, 0, 7] = float("nan")
    expected = _reference(q, k64, v64, rows, lens, 16, 0.125)
    assert not bool(expected[1, :3].isfinite().any()) and bool(expected[1, 3:].isfinite().all())
    torch.testing.assert_close(out.double(), expected, equal_nan=True, **F32_TOL)


@STORAGE
def test_kernel_refuses_mixed_scale_layouts(kernels, storage):
    q, (kq, vq, ks, vs), _, tables, lens_t, _ = static_case(
        64, 2, 2, 16, [5], storage, torch.float32
    )
    out = torch.empty_like(q)
    with pytest.raises(RuntimeError, match="both contiguous or both static"):
        kernels.paged_decode_attention(q, kq, vq, tables, lens_t, 16, 0.1, out, ks, vs.contiguous())


@STORAGE
def test_layer_writes_values_only_and_prefill_reads_them(storage):
    """A layer with static scales: its scales are the expanded [H_kv] ones, writing leaves
    them alone, and a chunk after 37 cached tokens attends to the dequantized context."""
    torch.manual_seed(7)
    heads, kv_heads, d, ctx, new = 8, 2, 32, 37, 11
    attn = Attention(heads, kv_heads, d, d**-0.5)
    k_scale, v_scale = torch.tensor([0.03, 0.05]), torch.tensor([0.02, 0.04])
    attn.static_kv_scales = (k_scale, v_scale)
    attn.allocate_cache(64, torch.float32, "int8" if storage == torch.int8 else "fp8_e4m3")
    assert attn.has_static_scales and attn.k_scale.stride() == (0, 1)
    assert attn.k_scale.untyped_storage().nbytes() == 2 * 2  # one bfloat16 per KV head
    slots = torch.randperm(64)[: ctx + new]
    attn._write(slots[:ctx], torch.randn(ctx, kv_heads, d), torch.randn(ctx, kv_heads, d))
    q = torch.randn(new, heads, d)
    k, v = torch.randn(new, kv_heads, d), torch.randn(new, kv_heads, d)
    mask = torch.ones(new, ctx + new, dtype=torch.bool).tril(ctx)
    md = AttentionMetadata(slots[ctx:], prefills=[PrefillChunk(0, new, slots, mask)])
    with attention_metadata(md):
        out = attn(q, k, v).view(new, heads, d)
    keys = gather_kv(attn.k_cache, attn.k_scale, slots, torch.float64).repeat_interleave(4, 1)
    values = gather_kv(attn.v_cache, attn.v_scale, slots, torch.float64).repeat_interleave(4, 1)
    scores = torch.einsum("qhd,nhd->hqn", q.double() * d**-0.5, keys)
    weights = scores.masked_fill(~mask, float("-inf")).softmax(-1)
    expected = torch.einsum("hqn,nhd->qhd", weights, values)
    torch.testing.assert_close(out.double(), expected, **F32_TOL)
    written = attn.k_cache.view(torch.uint8).index_select(0, slots[ctx:]).view(storage)
    expected_values = quantize_kv_static(k, storage, k_scale.bfloat16())
    assert bool((written.float() == expected_values.float()).all())
    assert bool((attn.k_scale == k_scale.bfloat16()).all())


@STORAGE
def test_scrub_blocks_zeroes_only_poison(storage):
    """Attention.scrub_blocks on a statically quantized cache: it reports the blocks that
    hold poison and zeroes every poison value in the blocks asked for, keeping every other
    byte; a block it is not asked about keeps its poison."""
    attn = Attention(4, 2, 16, 0.25)
    attn.static_kv_scales = (torch.tensor([0.1, 0.1]), torch.tensor([0.1, 0.1]))
    attn.allocate_cache(48, torch.float32, "int8" if storage == torch.int8 else "fp8_e4m3")
    k = torch.randn(48, 2, 16)
    k[3, 1, 2] = float("nan")  # block 0
    k[20, 0, 0] = float("inf")  # block 1
    attn._write(torch.arange(48), k, torch.randn(48, 2, 16))
    before = attn.k_cache.view(torch.uint8).clone()
    dirty = attn.scrub_blocks(torch.tensor([1, 2]), 16)
    assert dirty.tolist() == [True, False]
    after = attn.k_cache.view(torch.uint8)
    assert int(after[20, 0, 0]) == 0 and bool(is_poison(attn.k_cache[3, 1, 2]))
    changed = after != before
    assert int(changed.sum()) == 1
