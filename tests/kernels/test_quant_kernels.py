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


def _amx_or_skip(kernels) -> None:
    if not kernels.amx_available():
        pytest.skip("this CPU (or kernel build) has no AMX-INT8: w8a8 layers use oneDNN")


def _w8a8_reference(x, wq, ws, bias):
    """float64 (result, magnitude, tie allowance) of a w8a8 layer on x [T, K]."""
    xq, xs = quantize_rows(x)
    w, xd = wq.double() * ws.double().view(-1, 1), xq.double() * xs.double()
    b = torch.zeros(wq.shape[0], dtype=torch.float64) if bias is None else bias.double()
    # a tie rounded the other way (a reciprocal multiply) moves one term by one step of x
    ties = xs.double() * w.abs().max(1).values
    return xd @ w.T + b, xd.abs() @ w.abs().T + b.abs(), ties


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("matmul", ["auto", "onednn"])
@pytest.mark.parametrize("tokens", [1, 40])
def test_w8a8_linear_with_kernels(kernels, tokens: int, dtype: torch.dtype, matmul: str) -> None:
    torch.manual_seed(tokens)
    linear = Linear(96, 48, bias=True)
    wq, ws = quantize_rows(linear.weight)
    layer = Int8Linear(wq, ws.view(-1), linear.bias.detach().to(dtype), "w8a8", matmul=matmul)
    layer.enable_cpu_kernels(kernels)
    assert layer.prepack()
    auto = "amx" if kernels.amx_available() else "onednn"
    assert layer._packing == (auto if matmul == "auto" else matmul)
    x = torch.randn(tokens, 96).to(dtype)  # [T, K]
    got = layer(x).double()  # [T, N]
    ref, magnitude, ties = _w8a8_reference(x, wq, ws, linear.bias.detach().to(dtype))
    unit = torch.finfo(dtype).eps / 2 + 4 * EPS32
    assert bool(((got - ref).abs() <= unit * magnitude + ties).all())


# rows: one, a partial tile, two tiles and a partial third; out and in features off the
# kernel's blocks of 32 channels and 64 inputs; in 2048: int32 sums past float32's 2^24
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    ("rows", "n", "k"), [(1, 48, 96), (16, 100, 70), (37, 64, 2048), (70, 33, 64)]
)
@pytest.mark.parametrize("with_bias", [True, False])
def test_amx_w8a8_linear(kernels, rows, n, k, dtype, with_bias) -> None:
    _amx_or_skip(kernels)
    torch.manual_seed(rows + n + k)
    wq, ws = quantize_rows(torch.randn(n, k) * torch.rand(n, 1))
    ws = ws.view(-1).contiguous()
    wide = (torch.randn(rows, k + 8) * torch.rand(rows, 1) * 4).to(dtype)
    x = wide[:, :k]  # rows with a stride wider than their width
    bias = torch.randn(n).to(dtype) if with_bias else None
    packed = kernels.pack_int8_amx(wq)
    assert packed.numel() == -(-n // 32) * 32 * -(-k // 64) * 64  # padded to whole tiles
    got = kernels.w8a8_linear_amx(x, packed, ws, bias, n)
    assert got.dtype == dtype and got.shape == (rows, n)
    ref, magnitude, ties = _w8a8_reference(x, wq, ws, bias)
    # the int32 sum rounded to float32 (exact below 2^24), two scalings, the output rounding
    unit = torch.finfo(dtype).eps / 2 + 4 * EPS32
    assert bool(((got.double() - ref).abs() <= unit * magnitude + ties).all())


def test_amx_kernel_between_onednn_amx_matmuls(kernels) -> None:
    """The kernel sets the AMX tile registers up and releases them on each thread; oneDNN's
    AMX matmuls (bf16, INT8) called in between must still give their own results."""
    _amx_or_skip(kernels)
    torch.manual_seed(0)
    wq, ws = quantize_rows(torch.randn(256, 512))
    ws = ws.view(-1).contiguous()
    packed = kernels.pack_int8_amx(wq)
    onednn = torch.ops.onednn.qlinear_prepack(wq, None)
    zero_points = torch.zeros(256, dtype=torch.long)
    x = torch.randn(64, 512, dtype=torch.bfloat16)
    w16 = torch.randn(256, 512, dtype=torch.bfloat16)
    bf16_ref = torch.nn.functional.linear(x, w16)
    xq, _ = quantize_rows(x)
    int8_ref = torch._int_mm(xq, wq.t())  # [T, N] int32
    first = kernels.w8a8_linear_amx(x, packed, ws, None, 256)
    for _ in range(3):
        torch.testing.assert_close(torch.nn.functional.linear(x, w16), bf16_ref, rtol=0, atol=0)
        summed = torch.ops.onednn.qlinear_pointwise(
            xq, 1.0, 0, onednn, torch.ones(256), zero_points, None,
            1.0, 0, torch.float32, "none", [], "",
        )  # fmt: skip
        torch.testing.assert_close(summed, int8_ref.float(), rtol=0, atol=0)
        torch.testing.assert_close(
            kernels.w8a8_linear_amx(x, packed, ws, None, 256), first, rtol=0, atol=0
        )


@pytest.mark.parametrize(
    ("pack", "layer"),
    [("pack_int8_amx", "w8a8_linear_amx"), ("pack_int8_amx_bf16", "int8_linear_amx")],
)
def test_amx_linear_refuses_a_foreign_weight(kernels, pack: str, layer: str) -> None:
    """A weight packed for [64, 128] does not serve 64 inputs, nor other output sizes."""
    _amx_or_skip(kernels)
    packed = getattr(kernels, pack)(torch.ones(64, 128, dtype=torch.int8))
    x = torch.randn(2, 64, dtype=torch.bfloat16)
    with pytest.raises(RuntimeError, match=f"{layer}: packed must be {pack}'s result"):
        getattr(kernels, layer)(x, packed, torch.ones(64), None, 64)
    with pytest.raises(RuntimeError, match=f"{layer}: w_scales must be"):
        getattr(kernels, layer)(torch.randn(2, 128).bfloat16(), packed, torch.ones(8), None, 64)


@pytest.mark.parametrize("mode", ["w8a8", "int8"])
def test_amx_matmul_needs_the_kernels(mode: str) -> None:
    wq, ws = quantize_rows(torch.randn(32, 64))
    layer = Int8Linear(wq, ws.view(-1), None, mode, matmul="amx")
    with pytest.raises(RuntimeError, match="matmul='amx' needs the native CPU kernels"):
        layer.prepack(torch.bfloat16)


@pytest.mark.parametrize("matmul", ["auto", "onednn"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_activations_stay_non_finite(kernels, bad: float, matmul: str) -> None:
    torch.manual_seed(0)
    wq, ws = quantize_rows(torch.randn(16, 64))
    layer = Int8Linear(wq, ws.view(-1), None, "w8a8", matmul=matmul)
    layer.enable_cpu_kernels(kernels)
    layer.prepack()
    x = torch.randn(3, 64)  # [T, K]
    x[1, 5] = bad
    y = layer(x)  # [T, N]
    assert bool(torch.isfinite(y[0]).all()) and bool(torch.isfinite(y[2]).all())
    assert not bool(torch.isfinite(y[1]).any())  # the engine fails that request alone


@pytest.mark.parametrize(
    ("rows", "n", "k"), [(1, 48, 96), (16, 100, 70), (37, 64, 2048), (70, 33, 32)]
)
@pytest.mark.parametrize("with_bias", [True, False])
def test_amx_int8_weight_only_linear(kernels, rows, n, k, with_bias) -> None:
    """bfloat16 activations times INT8 weights widened to bfloat16 (exactly), summed in
    float32 on AMX-BF16 tiles, scaled per channel and rounded once to bfloat16."""
    _amx_or_skip(kernels)
    torch.manual_seed(rows + n + k)
    wq, ws = quantize_rows(torch.randn(n, k) * torch.rand(n, 1))
    ws = ws.view(-1).contiguous()
    wide = (torch.randn(rows, k + 8) * torch.rand(rows, 1) * 4).to(torch.bfloat16)
    x = wide[:, :k]  # rows with a stride wider than their width
    bias = torch.randn(n).to(torch.bfloat16) if with_bias else None
    packed = kernels.pack_int8_amx_bf16(wq)
    assert packed.numel() == -(-n // 32) * 32 * -(-k // 32) * 32  # int8: half a bf16 weight
    got = kernels.int8_linear_amx(x, packed, ws, bias, n)
    assert got.dtype == torch.bfloat16 and got.shape == (rows, n)
    w = wq.double() * ws.double().view(-1, 1)
    b = torch.zeros(n, dtype=torch.float64) if bias is None else bias.double()
    ref, magnitude = x.double() @ w.T + b, x.double().abs() @ w.abs().T + b.abs()
    # float32 sums of k exact products, one scaling, one rounding to bfloat16
    unit = torch.finfo(torch.bfloat16).eps / 2 + (k + 2) * EPS32
    assert bool(((got.double() - ref).abs() <= unit * magnitude).all())
    with pytest.raises(RuntimeError, match="multiplies bfloat16 activations"):
        kernels.int8_linear_amx(x.float(), packed, ws, None, n)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_int8_layers_pack_for_amx_in_bfloat16_models(kernels, dtype) -> None:
    """Only a bfloat16 model's int8 layers take the AMX-BF16 kernel; a float32 model's, and
    a bfloat16 one's without AMX, take the AVX2 kernel (tests/kernels/test_avx2_linear.py)."""
    torch.manual_seed(0)
    linear = Linear(64, 40, bias=True)
    wq, ws = quantize_rows(linear.weight)
    layer = Int8Linear(wq, ws.view(-1), linear.bias.detach().to(dtype), "int8")
    layer.enable_cpu_kernels(kernels)
    x = torch.randn(5, 64).to(dtype)  # [T, K]
    w = wq.double() * ws.double()
    bias = linear.bias.detach().to(dtype).double()
    ref, magnitude = x.double() @ w.T + bias, x.double().abs() @ w.abs().T + bias.abs()
    # torch's path rounds the scales to the activations' dtype too: two roundings of eps / 2
    unit = torch.finfo(dtype).eps + 64 * EPS32
    assert bool(((layer(x).double() - ref).abs() <= unit * magnitude).all())
    amx = dtype == torch.bfloat16 and kernels.amx_available()
    avx2 = not amx and kernels.avx2_linear_available()
    assert layer.prepack(dtype) == (amx or avx2)
    assert layer._packing == ("amx_bf16" if amx else "avx2" if avx2 else None)
    assert (layer.qweight.numel() == 0) == (amx or avx2)  # the packed copy replaced the plain one
    assert bool(((layer(x).double() - ref).abs() <= unit * magnitude).all())
