"""INT8 quantization (issue 14): kernels against a float64 reference, whole-engine runs,
weight memory and the error paths.

Tolerances come from the quantization scales and the float formats' unit roundoff, never
from fixed constants: a product of ``K`` terms accumulated in float32 is off by at most
about ``K * eps32`` times the sum of the terms' magnitudes.
"""

from __future__ import annotations

import pytest
import torch

from auto_glm.api import GLMModel
from auto_glm.kernels import cpu_kernels
from auto_glm.layers.linear import Linear
from auto_glm.layers.quant import (
    Int8Linear,
    check_w8a8,
    cpu_flags,
    quantize_rows,
    resolve_quantization,
)
from auto_glm.loader import load_model
from auto_glm.loader.errors import ModelLoadError
from auto_glm.sampling_params import SamplingParams

ARCHITECTURES = [
    "GlmForCausalLM",
    "Glm4ForCausalLM",
    "LlamaForCausalLM",
    "Qwen2ForCausalLM",
    "Qwen3ForCausalLM",
]
EPS32 = torch.finfo(torch.float32).eps
HAS_FAST_INT8 = any(f in cpu_flags() for f in ("avx512_vnni", "amx_int8"))
needs_fast_int8 = pytest.mark.skipif(not HAS_FAST_INT8, reason="CPU without VNNI/AMX INT8")


def _linear(k: int, n: int, seed: int) -> Linear:
    torch.manual_seed(seed)
    linear = Linear(k, n, bias=True)
    with torch.no_grad():
        linear.weight.normal_(0, 0.05)  # [n, k]
        linear.weight[3].zero_()  # an all-zero row must quantize to zeros, not NaN
    return linear


def _dequant(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return q.double() * scale.double()  # [R, C] * [R, 1]


@pytest.mark.parametrize("shape", [(1, 7), (5, 64), (33, 300)])
def test_quantize_rows_is_within_half_a_step(shape: tuple[int, int]) -> None:
    x = torch.randn(*shape) * torch.rand(shape[0], 1) * 10  # rows of very different ranges
    q, scale = quantize_rows(x)
    assert q.dtype == torch.int8 and scale.dtype == torch.float32 and scale.shape == (shape[0], 1)
    assert int(q.abs().max()) <= 127
    err = (x.double() - _dequant(q, scale)).abs()
    # half a step, plus the float32 rounding of the scale itself (relative eps / 2) that
    # moves q * scale by up to 127 * scale * eps / 2
    assert bool((err <= scale.double() * (0.5 + 64 * EPS32)).all())
    q0, s0 = quantize_rows(torch.zeros(2, 8))
    assert bool((q0 == 0).all()) and bool(torch.isfinite(s0).all())


# 1 and 4 tokens: aten._weight_int8pack_mm; 37: the weight converted for one matmul.
# in_features 72 (not a multiple of 16) is where that kernel fails for bfloat16.
@pytest.mark.parametrize("k", [96, 72, 13])
@pytest.mark.parametrize("tokens", [1, 4, 37])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int8_weight_only_matmul(tokens: int, dtype: torch.dtype, k: int) -> None:
    n = 72
    linear = _linear(k, n, seed=tokens)
    q, scale = quantize_rows(linear.weight)
    layer = Int8Linear.from_linear(linear, "int8")
    assert layer.qweight.dtype == torch.int8 and layer.scales.dtype == torch.float32
    x = torch.randn(tokens, k).to(dtype)  # [T, K]
    got = layer(x).double()  # [T, N]
    w = _dequant(q, scale)  # [N, K]
    ref = x.double() @ w.T + linear.bias.double()
    magnitude = x.double().abs() @ w.abs().T + linear.bias.double().abs()
    # float32: accumulation; half precision: the scales and the output are rounded once each
    unit = k * EPS32 if dtype == torch.float32 else 2 * torch.finfo(dtype).eps + k * EPS32
    assert bool(((got - ref).abs() <= unit * magnitude).all())


@needs_fast_int8
@pytest.mark.parametrize("matmul", ["onednn", "int_mm"])
@pytest.mark.parametrize("tokens", [1, 17, 40])
def test_w8a8_matmul(tokens: int, matmul: str) -> None:
    k, n = 128, 56
    linear = _linear(k, n, seed=tokens)
    wq, ws = quantize_rows(linear.weight)
    layer = Int8Linear(wq, ws.view(-1), linear.bias.detach(), "w8a8", matmul=matmul)
    x = torch.randn(tokens, k)  # [T, K]
    xq, xs = quantize_rows(x)
    unpacked = layer(x).double()  # [T, N], torch._int_mm until pre-packed
    assert layer.prepack() == (matmul == "onednn")
    assert layer._packing == ("onednn" if matmul == "onednn" else None)
    got = layer(x).double()  # [T, N]
    torch.testing.assert_close(got, unpacked, rtol=4 * EPS32, atol=0)
    w, xd = _dequant(wq, ws), _dequant(xq, xs)
    # int32 sums are exact: what is left is float32 rounding of the sum and of two scalings
    ref = xd @ w.T + linear.bias.double()
    magnitude = xd.abs() @ w.abs().T + linear.bias.double().abs()
    assert bool(((got - ref).abs() <= 4 * EPS32 * magnitude).all())
    # against the unquantized activations: at most half a step of x per term
    exact = x.double() @ w.T + linear.bias.double()
    assert bool(
        (
            (got - exact).abs()
            <= xs.double() * (0.5 + 64 * EPS32) * w.abs().sum(1) + 4 * EPS32 * magnitude
        ).all()
    )


def test_linear_weights_take_at_most_055x_bf16(make_checkpoint) -> None:
    path = make_checkpoint("Glm4ForCausalLM")
    full = load_model(path, device="cpu", dtype="bfloat16").model
    linears = {n: m for n, m in full.named_modules() if isinstance(m, Linear) and n != "lm_head"}
    bf16_bytes = sum(m.weight.numel() * 2 for m in linears.values())
    quant = load_model(path, device="cpu", dtype="bfloat16", quantization="int8").model
    layers = {n: m for n, m in quant.named_modules() if isinstance(m, Int8Linear)}
    assert sorted(layers) == sorted(linears)  # every linear but lm_head
    assert isinstance(quant.lm_head, Linear)
    int8_bytes = sum(m.weight_bytes() for m in layers.values())
    assert int8_bytes <= 0.55 * bf16_bytes
    # nothing full-precision stays behind: every tensor left is a bias, a norm, the embedding,
    # lm_head or an INT8 layer's own
    kept = sum(t.numel() * t.element_size() for t in (*quant.parameters(), *quant.buffers()))
    expected = int8_bytes + sum(
        t.numel() * t.element_size()
        for name, t in (*quant.named_parameters(), *quant.named_buffers())
        if not name.endswith((".qweight", ".scales"))
    )
    assert kept == expected
    assert all(not n.endswith("proj.weight") for n, _ in quant.named_parameters())
    with_head = load_model(path, device="cpu", quantization="int8", quantize_lm_head=True).model
    assert isinstance(with_head.lm_head, Int8Linear)


def test_tied_lm_head_is_quantized_into_its_own_copy(make_checkpoint) -> None:
    path = make_checkpoint("LlamaForCausalLM", tie_word_embeddings=True)
    # bfloat16 arithmetic asked for: a CPU without it would compute (and embed) in float32
    half = {"device": "cpu", "dtype": "bfloat16", "compute_dtype": "bfloat16"}
    loaded = load_model(path, quantization="int8", **half)
    assert loaded.model.lm_head.weight is loaded.model.model.embed_tokens.weight  # kept tied
    quant = load_model(path, quantization="int8", quantize_lm_head=True, **half).model
    assert isinstance(quant.lm_head, Int8Linear)
    assert quant.model.embed_tokens.weight.dtype == torch.bfloat16  # embeddings stay
    ids = torch.tensor([3, 5, 7])
    scale = quant.lm_head.scales[:, None]  # [vocab, 1]
    deq = quant.lm_head.qweight.float() * scale  # [vocab, hidden]
    err = (deq - quant.model.embed_tokens.weight.float()).abs()
    assert bool((err <= scale * (0.5 + 64 * EPS32)).all())
    assert quant.model.embed_tokens(ids).dtype == torch.bfloat16


def _first_tokens(model: GLMModel, prompts: list[list[int]], steps: int) -> list[list[int]]:
    params = SamplingParams(max_tokens=steps, temperature=0, ignore_eos=True)
    return [r.token_ids for r in model.generate_batch(prompts, params)]


def _engine_runs(path, device: str, dtype: str = "float32", **quant) -> list[Int8Linear]:
    """Greedy tokens of the engine with ``quant`` options against the unquantized engine's;
    returns the quantized model's INT8 layers."""
    # a shared 24-token prefix (prefix cache hits) and more prompts than sequences at once
    prompts = [[7, 11, 13, 17, 19, 23] * 4 + [30 + i, 40 + 2 * i] for i in range(12)]
    options = {"device": device, "dtype": dtype, "max_num_seqs": 4, "block_size": 8}
    with GLMModel(str(path), kv_cache_memory=2**22, **options) as base:
        expected = _first_tokens(base, prompts, 4)
    with GLMModel(str(path), kv_cache_memory=2**22, **options, **quant) as quantized:
        got = _first_tokens(quantized, prompts, 4)
        again = _first_tokens(quantized, prompts, 4)  # now from the prefix cache
        assert quantized.engine.stats().prefix_cache_hits > 0
        model = quantized.engine.loaded.model
        layers = [m for m in model.modules() if isinstance(m, Int8Linear)]
    assert again == got
    assert all(len(tokens) == 4 for tokens in got)
    # top-1 agreement of each step while the two runs still share their tokens so far
    agree = total = 0
    for ref, out in zip(expected, got, strict=True):
        for a, b in zip(ref, out, strict=True):
            total += 1
            agree += a == b
            if a != b:
                break
    assert agree / total >= 0.75, f"{path.name} {quant}: top-1 agreement {agree}/{total}"
    return layers


@pytest.mark.parametrize("mode", ["int8", pytest.param("w8a8", marks=needs_fast_int8)])
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_quantized_model_generates_through_the_engine(make_checkpoint, arch, mode) -> None:
    layers = _engine_runs(make_checkpoint(arch), "cpu", quantization=mode)
    assert layers
    # the engine pre-packs for its fastest CPU matmul (a float32 model here)
    kernels = cpu_kernels()
    if mode == "w8a8":
        amx = kernels is not None and kernels.amx_available()
        assert {m._packing for m in layers} == {"amx" if amx else "onednn"}
    else:
        avx2 = kernels is not None and kernels.avx2_linear_available()
        assert {m._packing for m in layers} == {"avx2" if avx2 else None}


@pytest.mark.parametrize("mode", ["int8", pytest.param("w8a8", marks=needs_fast_int8)])
def test_bfloat16_engine_packs_for_amx(make_checkpoint, mode) -> None:
    """A bfloat16 model's INT8 layers run on the AMX kernels where the CPU has AMX (int8:
    AMX-BF16 with the weight widened per call; w8a8: AMX-INT8), else oneDNN's (w8a8) or,
    for int8, the AVX2 kernel (whether the model computes in bfloat16 or, on a CPU without
    native bfloat16, in float32)."""
    layers = _engine_runs(make_checkpoint("Glm4ForCausalLM"), "cpu", "bfloat16", quantization=mode)
    kernels = cpu_kernels()
    amx = kernels is not None and kernels.amx_available()
    avx2 = kernels is not None and kernels.avx2_linear_available()
    int8 = "amx_bf16" if amx else "avx2" if avx2 else None
    want = {"int8": int8, "w8a8": "amx" if amx else "onednn"}[mode]
    assert layers and {m._packing for m in layers} == {want}


def test_int8_in_bfloat16_arithmetic_without_amx_takes_the_avx2_kernel(make_checkpoint) -> None:
    """compute_dtype='bfloat16' on a CPU without AMX (or with AVX512_BF16 only): the INT8
    layers widen their activations to float32 for the AVX2 kernel, instead of converting
    every INT8 weight per call on torch's path."""
    kernels = cpu_kernels()
    if kernels is None or kernels.amx_available() or not kernels.avx2_linear_available():
        pytest.skip("needs the native kernels with the AVX2 matmul, on a CPU without AMX")
    path = make_checkpoint("Qwen3ForCausalLM")
    layers = _engine_runs(path, "cpu", "bfloat16", quantization="int8", compute_dtype="bfloat16")
    assert layers and {m._packing for m in layers} == {"avx2"}
    assert all(m.bias is None or m.bias.dtype == torch.bfloat16 for m in layers)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize(
    "quant",
    [
        {"quantization": "w8a8"},
        {"quantization": "int8"},
        {"kv_cache_dtype": "int8"},
        {"kv_cache_dtype": "fp8_e4m3"},
        {"quantization": "w8a8", "kv_cache_dtype": "int8", "kv_cache_scales": "calibrate"},
    ],
    ids=["w8a8", "int8", "kv-int8", "kv-fp8", "w8a8-kv-int8-static"],
)
def test_quantized_engine_on_cuda(make_checkpoint, quant) -> None:
    """Each precision through the GPU backend (Triton attention, CUDA graphs), with
    continuous batching and prefix hits."""
    layers = _engine_runs(make_checkpoint("Qwen3ForCausalLM"), "cuda", **quant)
    assert bool(layers) == ("quantization" in quant)
    assert all(m._packing is None for m in layers)  # torch._int_mm on the plain INT8 weight


def test_bad_quantization_value_names_the_setting(make_checkpoint) -> None:
    assert resolve_quantization(None) == "none"
    with pytest.raises(ValueError, match=r"quantization='int4'.*none, int8, w8a8"):
        resolve_quantization("int4")
    path = make_checkpoint("Glm4ForCausalLM")
    with pytest.raises(ModelLoadError, match=r"quantization='int4'"):
        load_model(path, device="cpu", quantization="int4")
    with pytest.raises(ModelLoadError, match=r"quantize_lm_head=True.*quantization='int8'"):
        load_model(path, device="cpu", quantize_lm_head=True)


def test_w8a8_without_fast_int8_suggests_int8() -> None:
    cpu = torch.device("cpu")
    check_w8a8(cpu, {"avx512f", "amx_int8"})
    check_w8a8(cpu, {"avx512_vnni"})
    with pytest.raises(ValueError, match=r"avx512_vnni, amx_int8.*quantization='int8'"):
        check_w8a8(cpu, {"avx2", "avx512f", "avx512_bf16"})
    with pytest.raises(ValueError, match=r"CPU or a CUDA GPU, not on mps.*quantization='int8'"):
        check_w8a8(torch.device("mps"), {"amx_int8"})


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("tokens", [1, 16, 17, 40])
@pytest.mark.parametrize(("k", "n"), [(128, 56), (100, 60)])
def test_w8a8_matmul_on_cuda(tokens: int, k: int, n: int) -> None:
    """cuBLAS's INT8 matmul with padded rows (<= 16) and the float32 path for sizes that
    are not multiples of 8: both give the exact int32 sums."""
    cuda = torch.device("cuda")
    check_w8a8(cuda)
    linear = _linear(k, n, seed=tokens)
    wq, ws = quantize_rows(linear.weight)
    layer = Int8Linear(wq, ws.view(-1), linear.bias.detach(), "w8a8").to(cuda)
    x = torch.randn(tokens, k)  # [T, K]
    got = layer(x.to(cuda)).double().cpu()  # [T, N]
    xq, xs = quantize_rows(x)
    sums = xq.double() @ wq.double().T  # [T, N], exact
    scales = xs.double() * ws.double().view(1, -1)  # [T, N]
    ref = sums * scales + linear.bias.double()
    magnitude = (xq.double().abs() @ wq.double().abs().T) * scales + linear.bias.double().abs()
    assert bool(((got - ref).abs() <= 4 * EPS32 * magnitude).all())


def test_server_config_quantization(make_checkpoint) -> None:
    from pydantic import ValidationError

    from auto_glm.engine.config import EngineConfig
    from auto_glm.serving.config import ServerConfig
    from auto_glm.serving.table_setup import load_settings

    settings = load_settings(ServerConfig(quantization="int8", device="cpu"))
    engine = settings.build(make_checkpoint("Glm4ForCausalLM"), EngineConfig(kv_cache_memory=2**20))
    try:
        assert engine.loaded.quantization == "int8"
        assert isinstance(engine.loaded.model.model.layers[0].mlp.down_proj, Int8Linear)
    finally:
        engine.shutdown()
    with pytest.raises(ValidationError, match="quantization"):
        ServerConfig(quantization="int4")
