"""The fused RMSNorm and SiLU-and-multiply kernels against the layers' torch path."""

from __future__ import annotations

import pytest
import torch

from auto_glm.kernels import cpu_kernels
from auto_glm.layers.linear import SiluAndMul
from auto_glm.layers.norm import RMSNorm


def _pair(module_type, kernels, *args):
    """The same layer twice: torch path, and with the native kernels."""
    plain, fused = module_type(*args), module_type(*args)
    fused.load_state_dict(plain.state_dict())
    fused.enable_kernels(kernels)
    return plain, fused


TOLERANCE = {
    torch.float32: {"atol": 1e-5, "rtol": 1e-5},
    torch.bfloat16: {"atol": 2e-2, "rtol": 2e-2},
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norm_with_and_without_residual(kernels, dtype):
    g = torch.Generator().manual_seed(0)
    plain, fused = _pair(RMSNorm, kernels, 96, 1e-6)
    with torch.no_grad():
        plain.weight.copy_(torch.randn(96, generator=g))
        fused.weight.copy_(plain.weight)
    plain, fused = plain.to(dtype), fused.to(dtype)
    x = (torch.randn(7, 96, generator=g) * 3).to(dtype)
    residual = torch.randn(7, 96, generator=g).to(dtype)
    torch.testing.assert_close(fused(x), plain(x), **TOLERANCE[dtype])

    expected_out, expected_residual = plain(x, residual)
    out, new_residual = fused(x, residual.clone())
    torch.testing.assert_close(out, expected_out, **TOLERANCE[dtype])
    torch.testing.assert_close(new_residual, expected_residual, **TOLERANCE[dtype])


def test_rms_norm_reads_strided_rows(kernels):
    plain, fused = _pair(RMSNorm, kernels, 32, 1e-5)
    wide = torch.randn(5, 48)
    x = wide[:, :32]  # rows with a stride, as slices of a fused projection have
    torch.testing.assert_close(fused(x), plain(x))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_silu_and_mul(kernels, dtype):
    plain, fused = _pair(SiluAndMul, kernels)
    x = (torch.randn(9, 2 * 200, generator=torch.Generator().manual_seed(1)) * 4).to(dtype)
    torch.testing.assert_close(fused(x), plain(x), **TOLERANCE[dtype])


def test_bad_inputs_are_refused_with_the_reason(kernels):
    with pytest.raises(RuntimeError, match="share one dtype"):
        kernels.rms_norm(
            torch.randn(2, 8), torch.ones(8, dtype=torch.float64), 1e-6, torch.empty(2, 8)
        )
    with pytest.raises(RuntimeError, match=r"\[rows, 2 \* width\]"):
        kernels.silu_and_mul(torch.randn(2, 7), torch.empty(2, 3))


def test_no_compiler_means_a_warning_and_the_torch_path(monkeypatch, tmp_path, caplog):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))  # no cached build to load
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    with caplog.at_level("WARNING", logger="auto_glm.kernels"):
        assert cpu_kernels.__wrapped__() is None
    assert "apt install g++" in caplog.text


NAN, INF = float("nan"), float("inf")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_zero_rows_give_empty_results(kernels, dtype):
    plain, fused = _pair(RMSNorm, kernels, 64, 1e-6)
    plain, fused = plain.to(dtype), fused.to(dtype)
    x = torch.empty(0, 64, dtype=dtype)
    assert fused(x).shape == plain(x).shape == (0, 64)
    out, residual = fused(x, torch.empty(0, 64, dtype=dtype))
    assert out.shape == residual.shape == (0, 64)
    plain, fused = _pair(SiluAndMul, kernels)
    assert fused(torch.empty(0, 128, dtype=dtype)).shape == (0, 64)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_non_finite_activations_come_out_where_torch_gives_them(kernels, dtype):
    """-ffast-math alone let the compiler assume finite values: one inf made a whole row
    NaN, where torch gives NaN in that column only. Finite rows stay as they were."""
    g = torch.Generator().manual_seed(4)
    plain, fused = _pair(RMSNorm, kernels, 64, 1e-6)
    plain, fused = plain.to(dtype), fused.to(dtype)
    x = torch.randn(7, 64, generator=g).to(dtype)
    x[0, 3], x[1, 5], x[2, 7], x[3] = NAN, INF, -INF, INF
    residual = torch.randn(7, 64, generator=g).to(dtype)
    residual[4, 9] = NAN
    tol = TOLERANCE[dtype]
    torch.testing.assert_close(fused(x), plain(x), equal_nan=True, **tol)
    expected_out, expected_residual = plain(x, residual)
    out, new_residual = fused(x, residual.clone())
    torch.testing.assert_close(out, expected_out, equal_nan=True, **tol)
    torch.testing.assert_close(new_residual, expected_residual, equal_nan=True, **tol)
    assert out[5:].isfinite().all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_silu_and_mul_with_non_finite_and_huge_gates(kernels, dtype):
    """silu(-100) is -0: -ffast-math's approximate division made it NaN."""
    plain, fused = _pair(SiluAndMul, kernels)
    gate = torch.tensor([NAN, INF, -INF, -89.0, -100.0, -1e30, 100.0, 1e30, 1.0, 1.0, 1.0])
    up = torch.tensor([1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, NAN, INF, -INF])
    x = torch.cat([gate, up])[None].repeat(3, 1).to(dtype)
    expected = plain(x)
    assert expected[:, 3:8].isfinite().all()
    torch.testing.assert_close(fused(x), expected, equal_nan=True, **TOLERANCE[dtype])


def test_float16_is_refused_by_every_fused_kernel(kernels):
    x, w = torch.randn(2, 8, dtype=torch.float16), torch.ones(8, dtype=torch.float16)
    refused = r" supports float32 and bfloat16, got Half"
    with pytest.raises(RuntimeError, match="rms_norm" + refused):
        kernels.rms_norm(x, w, 1e-6, torch.empty_like(x))
    with pytest.raises(RuntimeError, match="add_rms_norm" + refused):
        kernels.add_rms_norm(x, x.clone(), w, 1e-6, torch.empty_like(x))
    with pytest.raises(RuntimeError, match="silu_and_mul" + refused):
        kernels.silu_and_mul(x, torch.empty(2, 4, dtype=torch.float16))
