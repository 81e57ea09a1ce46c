"""The native CPU decode-attention kernel against a float64 reference, with no model."""

from __future__ import annotations

import pytest
import torch

from auto_glm.kernels import DECODE_HEAD_DIMS
from auto_glm.layers.attention import Attention, AttentionMetadata
from auto_glm.layers.attention_backends import CpuBackend, TorchBackend


@pytest.fixture(scope="module")
def kernel(kernels):
    return kernels.paged_decode_attention


def torch_decode(attn: Attention, q: torch.Tensor, md: AttentionMetadata) -> torch.Tensor:
    """The torch backend's decode attention of ``attn`` over its cache: q [B, H, D]."""
    out = torch.empty_like(q)
    TorchBackend().decode(attn, q, md, out)
    return out


def _paged_case(head_dim, group, kv_heads, block_size, lens, dtype, seed=0):
    """Random caches with each sequence's blocks scattered; q is a strided view, like the
    q the model slices out of its fused qkv projection."""
    g = torch.Generator().manual_seed(seed)
    num_blocks = sum(-(-n // block_size) for n in lens) + 3
    shape = (num_blocks * block_size, kv_heads, head_dim)
    k_cache = torch.randn(shape, generator=g).to(dtype)
    v_cache = torch.randn(shape, generator=g).to(dtype)
    order = (torch.randperm(num_blocks - 1, generator=g) + 1).tolist()
    tables = []
    for n in lens:
        count = -(-n // block_size)
        tables.append(order[:count])
        order = order[count:]
    width = max(len(t) for t in tables)
    padded = torch.tensor([t + [0] * (width - len(t)) for t in tables])
    heads = kv_heads * group
    fused = torch.randn(len(lens), heads * head_dim + 40, generator=g).to(dtype)
    q = fused[:, : heads * head_dim].view(len(lens), heads, head_dim)
    return q, k_cache, v_cache, padded, torch.tensor(lens), tables


def _reference(q, k_cache, v_cache, tables, lens, block_size, scale):
    group = q.shape[1] // k_cache.shape[1]
    out = []
    for i, n in enumerate(lens):
        slots = torch.tensor(
            [tables[i][t // block_size] * block_size + t % block_size for t in range(n)]
        )
        k = k_cache[slots].double().repeat_interleave(group, 1)  # [n, H, D]
        v = v_cache[slots].double().repeat_interleave(group, 1)
        weights = torch.einsum("hd,nhd->hn", q[i].double() * scale, k).softmax(-1)
        out.append(torch.einsum("hn,nhd->hd", weights, v))
    return torch.stack(out)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("head_dim", DECODE_HEAD_DIMS)
def test_matches_reference_for_every_head_dim(kernel, head_dim, dtype):
    """A float32 cache is read in place, a bfloat16 one converted a tile at a time; large
    head dims sum their outputs a group of chunks at a time."""
    lens = [1, 15, 16, 17, 33, 100]
    q, kc, vc, padded, lens_t, tables = _paged_case(head_dim, 3, 2, 16, lens, dtype)
    out = torch.full_like(q, float("nan"))
    kernel(q, kc, vc, padded, lens_t, 16, head_dim**-0.5, out)
    expected = _reference(q, kc, vc, tables, lens, 16, head_dim**-0.5)
    tolerance = 1e-4 if dtype == torch.float32 else 2e-2  # bfloat16: the output's rounding
    torch.testing.assert_close(out.double(), expected, atol=tolerance / 5, rtol=tolerance)


@pytest.mark.parametrize(
    ("group", "kv_heads", "block_size"),
    [(1, 4, 16), (6, 2, 8), (4, 1, 32), (2, 2, 1), (3, 1, 4), (2, 2, 12), (5, 1, 24)],
)
def test_groups_and_block_sizes(kernel, group, kv_heads, block_size):
    lens = [1, 7, 8, 9, 31, 32, 33, 64, 129]
    q, kc, vc, padded, lens_t, tables = _paged_case(
        64, group, kv_heads, block_size, lens, torch.float32, seed=1
    )
    out = torch.empty_like(q)
    kernel(q, kc, vc, padded, lens_t, block_size, 0.125, out)
    expected = _reference(q, kc, vc, tables, lens, block_size, 0.125)
    torch.testing.assert_close(out.double(), expected, atol=2e-5, rtol=1e-4)


def test_bfloat16(kernel):
    lens = [5, 40, 77]
    q, kc, vc, padded, lens_t, tables = _paged_case(128, 4, 2, 16, lens, torch.bfloat16, seed=2)
    out = torch.empty_like(q)
    kernel(q, kc, vc, padded, lens_t, 16, 128**-0.5, out)
    expected = _reference(q, kc, vc, tables, lens, 16, 128**-0.5)
    torch.testing.assert_close(out.double(), expected, atol=2e-2, rtol=2e-2)


def test_agrees_with_the_torch_path_of_the_layer(kernel):
    lens = [3, 50, 200]
    q, kc, vc, padded, lens_t, _ = _paged_case(64, 6, 2, 16, lens, torch.float32, seed=3)
    attn = Attention(12, 2, 64, 0.125)
    attn.k_cache, attn.v_cache = kc, vc
    md = AttentionMetadata(
        slot_mapping=torch.empty(0, dtype=torch.long),
        num_decodes=len(lens),
        decode_block_tables=padded,
        decode_context_lens=lens_t,
    )
    out = torch.empty_like(q)
    kernel(q, kc, vc, padded, lens_t, 16, 0.125, out)
    torch.testing.assert_close(out, torch_decode(attn, q, md), atol=2e-5, rtol=1e-4)


def test_bad_inputs_are_refused_with_the_reason(kernel):
    q, kc, vc, padded, lens_t, _ = _paged_case(48, 2, 2, 16, [5], torch.float32)
    with pytest.raises(RuntimeError, match="head_dim=48"):
        kernel(q, kc, vc, padded, lens_t, 16, 0.1, torch.empty_like(q))
    q, kc, vc, padded, lens_t, _ = _paged_case(64, 2, 2, 16, [5], torch.float32)
    with pytest.raises(RuntimeError, match="share one dtype"):
        kernel(q, kc.double(), vc.double(), padded, lens_t, 16, 0.1, torch.empty_like(q))
    with pytest.raises(RuntimeError, match=r"context_lens\[0\]=17 is outside 1\.\.16"):
        kernel(q, kc, vc, padded, torch.tensor([17]), 16, 0.1, torch.empty_like(q))
    with pytest.raises(RuntimeError, match=r"block_tables\[0\]\[0\]=99 is not a block"):
        kernel(q, kc, vc, torch.tensor([[99]]), lens_t, 16, 0.1, torch.empty_like(q))
    with pytest.raises(RuntimeError, match="int64"):
        kernel(q, kc, vc, padded.int(), lens_t, 16, 0.1, torch.empty_like(q))


@pytest.mark.parametrize(("head_dim", "used"), [(64, True), (128, True), (48, False)])
def test_the_layer_takes_it_only_for_a_built_head_dim(kernels, kernel, head_dim, used):
    attn = Attention(4, 2, head_dim, head_dim**-0.5)
    attn.enable_cpu_kernels(kernels)
    backend = attn.backend
    assert (isinstance(backend, CpuBackend) and backend.decode_kernel is kernel) is used


def test_no_sequences_give_an_empty_result(kernel):
    q, kc, vc, *_ = _paged_case(64, 2, 2, 16, [5], torch.float32)
    tables, lens = torch.zeros(0, 1, dtype=torch.long), torch.zeros(0, dtype=torch.long)
    out = torch.empty(0, 4, 64)
    kernel(q[:0], kc, vc, tables, lens, 16, 0.125, out)
    assert out.shape == (0, 4, 64)


NAN, INF = float("nan"), float("inf")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    ("where", "value"),
    [
        ("q", NAN),
        ("q", INF),
        ("k", NAN),
        ("k", INF),
        ("k", -INF),
        ("v", NAN),
        ("v", INF),
        ("beyond", NAN),
    ],
)
def test_non_finite_inputs_come_out_where_the_reference_has_them(kernel, dtype, where, value):
    """One bad value in the second sequence's query or context; "beyond" puts it in a slot of
    its last block past its length, which it must not read. The other sequences are intact."""
    lens = [9, 21, 40]
    q, kc, vc, padded, lens_t, tables = _paged_case(64, 3, 2, 16, lens, dtype, seed=5)
    slot = tables[1][0] * 16 + 4
    if where == "q":
        q[1, 2, 7] = value
    elif where == "k":
        kc[slot, 0, 7] = value
    elif where == "v":
        vc[slot, 1, 7] = value
    else:
        past_the_end = tables[1][1] * 16 + 8  # its 21 tokens end at slot 4 of block 1
        kc[past_the_end, 0, 7] = vc[past_the_end, 0, 7] = value
    out = torch.empty_like(q)
    kernel(q, kc, vc, padded, lens_t, 16, 0.125, out)
    expected = _reference(q, kc, vc, tables, lens, 16, 0.125)
    assert expected[[0, 2]].isfinite().all()
    assert where == "beyond" or not expected[1].isfinite().all()
    tol = {"atol": 2e-2, "rtol": 2e-2} if dtype == torch.bfloat16 else {"atol": 2e-5, "rtol": 1e-4}
    torch.testing.assert_close(out.double(), expected, equal_nan=True, **tol)


def test_float16_is_refused(kernel):
    q, kc, vc, padded, lens_t, _ = _paged_case(64, 2, 2, 16, [5], torch.float16)
    with pytest.raises(
        RuntimeError, match="paged_decode_attention supports float32 and bfloat16, got Half"
    ):
        kernel(q, kc, vc, padded, lens_t, 16, 0.1, torch.empty_like(q))
