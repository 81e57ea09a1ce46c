"""The w8a8 activation kernels (csrc/quant.cpp) against the torch path and a float64
reference; tolerances from the scales and the formats' unit roundoff."""

from __future__ import annotations

import pytest
import torch

from auto_glm.layers.linear import Linear
from auto_glm.layers.quant import Int8Linear, cpu_flags, quantize_rows

EPS32 = torch.finfo(torch.float32).eps
pytestmark = pytest.mark.skipif(
    not any(f in cpu_flags() for f in ("avx512_vnni", "amx_int8")),
    reason="w8a8 needs a CPU with VNNI or AMX INT8",
)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 7, 64])
def test_quantize_rows_int8_matches_torch(kernels, rows: int, dtype: torch.dtype) -> None:
    wide = (torch.randn(rows, 200) * torch.rand(rows, 1) * 8).to(dtype)
    x = wide[:, :150]  # rows with a stride wider than their width
    x[0].zero_()
    q = torch.empty(x.shape, dtype=torch.int8)  # [R, C]
    scales = torch.empty(rows, 1)  # [R, 1]
    kernels.quantize_rows_int8(x, q, scales)
    ref_q, ref_scales = quantize_rows(x)
    torch.testing.assert_close(scales, ref_scales, rtol=EPS32, atol=0)
    # the same levels, but for a tie that a reciprocal multiply may round the other way
    assert int((q.int() - ref_q.int()).abs().max()) <= 1
    err = (x.double() - q.double() * scales.double()).abs()
    # half a step, plus the float32 rounding of the scale itself (relative eps / 2) that
    # moves q * scale by up to 127 * scale * eps / 2
    assert bool((err <= scales.double() * (0.5 + 64 * EPS32)).all())
    assert bool((q[0] == 0).all())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_bias", [True, False])
def test_scale_rows(kernels, dtype: torch.dtype, with_bias: bool) -> None:
    acc = torch.randn(9, 33) * 1000  # [R, N]
    row_scales = torch.rand(9, 1)  # [R, 1]
    bias = torch.randn(33).to(dtype) if with_bias else None
    out = torch.empty(9, 33, dtype=dtype)
    kernels.scale_rows(acc, row_scales, bias, out)
    ref = acc.double() * row_scales.double()
    magnitude = ref.abs()
    if bias is not None:
        ref, magnitude = ref + bias.double(), magnitude + bias.double().abs()
    # one float32 multiply-add, then one rounding to the output dtype
    unit = torch.finfo(dtype).eps / 2 + 2 * EPS32
    assert bool(((out.double() - ref).abs() <= unit * magnitude).all())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tokens", [1, 40])
def test_w8a8_linear_with_kernels(kernels, tokens: int, dtype: torch.dtype) -> None:
    torch.manual_seed(tokens)
    linear = Linear(96, 48, bias=True)
    wq, ws = quantize_rows(linear.weight)
    layer = Int8Linear(wq, ws.view(-1), linear.bias.detach().to(dtype), "w8a8")
    layer.enable_cpu_kernels(kernels)
    x = torch.randn(tokens, 96).to(dtype)  # [T, K]
    xq, xs = quantize_rows(x)
    got = layer(x).double()  # [T, N]
    w, xd = wq.double() * ws.double(), xq.double() * xs.double()
    bias = linear.bias.detach().to(dtype).double()
    ref, magnitude = xd @ w.T + bias, xd.abs() @ w.abs().T + bias.abs()
    # a tie rounded the other way moves one term by one activation step
    ties = xs.double() * w.abs().max(1).values
    unit = torch.finfo(dtype).eps / 2 + 4 * EPS32
    assert bool(((got - ref).abs() <= unit * magnitude + ties).all())


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_activations_stay_non_finite(kernels, bad: float) -> None:
    torch.manual_seed(0)
    linear = Linear(64, 16, bias=False)
    layer = Int8Linear.from_linear(linear, "w8a8")
    layer.enable_cpu_kernels(kernels)
    x = torch.randn(3, 64)  # [T, K]
    x[1, 5] = bad
    y = layer(x)  # [T, N]
    assert bool(torch.isfinite(y[0]).all()) and bool(torch.isfinite(y[2]).all())
    assert not bool(torch.isfinite(y[1]).any())  # the engine fails that request alone
