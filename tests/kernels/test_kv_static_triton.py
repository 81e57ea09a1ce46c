"""The Triton paged decode and prefill kernels over a cache with static KV scales (one per
KV head, an expanded [slots, H_kv] view with slot stride 0) against a float64 reference
computed from the dequantized cache; an int8 poison value reads as NaN. Without a CUDA GPU
they run in triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1)."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed (pip install 'open-autoglm[gpu]')")

from auto_glm.kernels import triton as triton_kernels  # noqa: E402
from auto_glm.kernels.triton import checks  # noqa: E402
from auto_glm.layers.kv_static import quantize_kv_static, static_scale  # noqa: E402
from tests.kernels.test_paged_attention import _paged_case, _reference  # noqa: E402
from tests.kernels.test_triton_attention import (  # noqa: E402
    DEVICE,
    TOL,
    _prefill_case,
    _prefill_reference,
)

if DEVICE.type == "cpu" and not checks.INTERPRETED:
    pytest.skip("the Triton kernels cannot run here", allow_module_level=True)

FP8 = torch.float8_e4m3fn
STORAGE = pytest.mark.parametrize("storage", [torch.int8, FP8], ids=["int8", "fp8"])


def _static(cache, storage):
    """(values, [H_kv] float32 scales, the dequantized float64 cache)."""
    scale = static_scale(cache.abs().amax(dim=(0, 2)), storage, 1.25)
    values = quantize_kv_static(cache, storage, scale)
    return values, scale, values.double() * scale.double()[:, None]


def _expanded(scale, slots):
    """[H_kv] -> bfloat16 [slots, H_kv] on DEVICE with slot stride 0."""
    return scale.to(device=DEVICE, dtype=torch.bfloat16).expand(slots, scale.shape[0])


def _run(kernel, q, kq, vq, index, block_size, scale, ks, vs):
    args = [t.to(DEVICE) for t in (q, kq, vq, *index)]
    scales = _expanded(ks, kq.shape[0]), _expanded(vs, kq.shape[0])
    assert scales[0].stride(0) == 0
    out = torch.full_like(args[0], float("nan"))
    kernel(*args, block_size, scale, out, *scales)
    return out.cpu().double()


@STORAGE
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_over_static_scales(storage, dtype):
    lens = [1, 15, 16, 17, 70]
    q, kc, vc, tables, lens_t, rows = _paged_case(80, 4, 2, 16, lens, torch.float32, 4)
    kq, ks, k64 = _static(kc * torch.tensor([1.0, 4.0]).view(1, 2, 1), storage)
    vq, vs, v64 = _static(vc, storage)
    q = q.to(dtype)
    out = _run(triton_kernels.paged_decode_attention, q, kq, vq, (tables, lens_t), 16, 0.1, ks, vs)
    torch.testing.assert_close(out, _reference(q, k64, v64, rows, lens, 16, 0.1), **TOL[dtype])


@STORAGE
def test_prefill_over_static_scales(storage):
    chunks = [(0, 7), (21, 12)]
    q, kc, vc, starts, seq_lens, tables, rows = _prefill_case(
        80, 4, 2, 16, chunks, torch.float32, 5
    )
    kq, ks, k64 = _static(kc * 2, storage)
    vq, vs, v64 = _static(vc, storage)
    q = q.to(torch.bfloat16)
    index = (starts, seq_lens, tables)
    out = _run(triton_kernels.paged_prefill_attention, q, kq, vq, index, 16, 0.1, ks, vs)
    expected = _prefill_reference(q, k64, v64, chunks, rows, 16, 0.1)
    torch.testing.assert_close(out, expected, **TOL[torch.bfloat16])


@STORAGE
def test_decode_reads_a_poisoned_value_as_nan(storage):
    lens = [9, 21]
    q, kc, vc, tables, lens_t, rows = _paged_case(64, 2, 2, 16, lens, torch.float32, 6)
    slot = rows[1][0] * 16 + 3
    kc[slot, 1, 5] = float("nan")
    kq, ks, k64 = _static(kc.nan_to_num(0.0), storage)
    kq = quantize_kv_static(kc, storage, ks)
    k64[slot, 1, 5] = float("nan")
    vq, vs, v64 = _static(vc, storage)
    out = _run(triton_kernels.paged_decode_attention, q, kq, vq, (tables, lens_t), 16, 0.1, ks, vs)
    expected = _reference(q, k64, v64, rows, lens, 16, 0.1)
    assert not bool(expected[1, 2:].isfinite().any()) and bool(expected[1, :2].isfinite().all())
    torch.testing.assert_close(out, expected, equal_nan=True, **TOL[torch.float32])
