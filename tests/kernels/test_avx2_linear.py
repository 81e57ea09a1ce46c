"""The AVX2 narrow-weight linear kernel (csrc/avx2_linear.cpp) against a float64 reference,
and the layers that use it: a bfloat16 or float16 checkpoint computing in float32 keeps its
weights in their dtype, and a float32 model's int8 weights are multiplied without a copy."""

from __future__ import annotations

import re
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from auto_glm import GLMModel, SamplingParams
from auto_glm.layers.linear import Linear
from auto_glm.layers.quant import Int8Linear, quantize_linears, quantize_rows
from auto_glm.loader import load_model
from tests.reference import hf_greedy, prefill_logits, random_prompts

EPS32 = torch.finfo(torch.float32).eps
FORMATS = [torch.bfloat16, torch.float16, torch.int8]


@pytest.fixture(scope="module")
def avx2(kernels):
    if not kernels.avx2_linear_available():
        pytest.skip("the kernels were built for a CPU without AVX2, FMA and F16C")
    return kernels


def _weight(
    dtype: torch.dtype, out_features: int, in_features: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """What pack_linear_avx2 takes for ``dtype`` (float32 holding bfloat16 or float16 values,
    as the loader leaves them, or an int8 weight) and the int8 weight's channel scales."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(out_features, in_features, generator=gen)
    if dtype != torch.int8:
        return w.to(dtype).float(), None
    q, scales = quantize_rows(w * torch.rand(out_features, 1, generator=gen))
    return q, scales.view(-1)


@pytest.mark.parametrize("dtype", [torch.float16, torch.int8])
def test_pack_keeps_the_channels_in_order(kernels, dtype) -> None:
    w, _ = _weight(dtype, 20, 3, seed=0)  # one whole panel of 16 and a panel of 4 (zeros)
    packed = kernels.pack_linear_avx2(w, dtype)  # [panels, in, 16]
    assert packed.shape == (2, 3, 16) and packed.dtype == dtype
    padded = torch.cat([w.to(dtype), torch.zeros(12, 3, dtype=dtype)])  # [32, in]
    assert torch.equal(packed.transpose(1, 2).reshape(32, 3), padded)


def test_bf16_pack_puts_two_channels_in_each_pair_of_lanes(kernels) -> None:
    w, _ = _weight(torch.bfloat16, 20, 3, seed=0)
    packed = kernels.pack_linear_avx2(w, torch.bfloat16)  # [panels, in, 16]
    assert packed.shape == (2, 3, 16) and packed.dtype == torch.bfloat16
    padded = torch.cat([w, torch.zeros(12, 3)])  # [32, in]
    for p in range(2):
        for i in range(8):
            assert torch.equal(packed[p, :, 2 * i].float(), padded[16 * p + i])
            assert torch.equal(packed[p, :, 2 * i + 1].float(), padded[16 * p + 8 + i])


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
@pytest.mark.parametrize("out_features", [1, 16, 40, 96])
@pytest.mark.parametrize("rows", [1, 5, 6, 13, 64, 301])
@pytest.mark.parametrize("in_features", [300, 2500])
@pytest.mark.parametrize("dtype", FORMATS, ids=str)
def test_linear_matches_float64(
    avx2, dtype, in_features: int, rows: int, out_features: int, bias: bool
) -> None:
    """Blocks of rows (216 rows of 300 inputs fill the kernel's 256 KiB, 60 of 1024) and of
    inputs (2500 = 1024 + 1024 + 452, each block's sums added to the last's)."""
    w, scales = _weight(dtype, out_features, in_features, seed=rows)
    gen = torch.Generator().manual_seed(out_features)
    wide = torch.randn(rows, in_features + 7, generator=gen)
    x = wide[:, :in_features]  # rows with a stride wider than their width
    b = torch.randn(out_features, generator=gen) if bias else None
    packed = avx2.pack_linear_avx2(w, dtype)
    y = avx2.linear_avx2(x, packed, scales, b, out_features)  # [rows, out]
    assert y.shape == (rows, out_features) and y.dtype == torch.float32
    ref = x.double() @ w.double().T  # [rows, out]
    magnitude = x.double().abs() @ w.double().abs().T
    if scales is not None:
        ref, magnitude = ref * scales.double(), magnitude * scales.double()
    if b is not None:
        ref, magnitude = ref + b.double(), magnitude + b.double().abs()
    # the weights are exact; the float32 sums of `in` products, one scaling and the bias err
    # by at most (in + 2) * eps * |.|
    assert bool(((y.double() - ref).abs() <= (in_features + 2) * EPS32 * magnitude).all())


@pytest.mark.parametrize("dtype", FORMATS, ids=str)
def test_linear_keeps_nan_and_inf(avx2, dtype) -> None:
    w, scales = _weight(dtype, 16, 8, seed=3)
    x = torch.randn(3, 8)
    x[1, 2] = float("nan")
    x[2, 5] = float("inf")
    y = avx2.linear_avx2(x, avx2.pack_linear_avx2(w, dtype), scales, None, 16)
    assert bool(y[0].isfinite().all())
    assert bool(y[1].isnan().all())
    assert not bool(y[2].isfinite().any())


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"x": torch.randn(2, 8).bfloat16()}, "x must be float32"),
        ({"x": torch.randn(2, 9)}, "for a weight with 9 inputs"),
        ({"out_features": 33}, "out_features 33 does not match 2 panels"),
        ({"bias": torch.randn(20).bfloat16()}, "bias must be a contiguous float32 [20]"),
        ({"scales": torch.ones(19)}, "scales must be a contiguous float32 [20]"),
        ({"packed": torch.zeros(2, 8, 16)}, "packed must come from pack_linear_avx2"),
        ({"scales": None}, "an int8 weight needs its channel scales"),
    ],
    ids=["dtype", "inputs", "outputs", "bias", "scales", "foreign", "no-scales"],
)
def test_linear_names_a_bad_argument(avx2, change: dict, message: str) -> None:
    q, scales = _weight(torch.int8, 20, 8, seed=4)
    args = {
        "x": torch.randn(2, 8),
        "packed": avx2.pack_linear_avx2(q, torch.int8),
        "scales": scales,
        "bias": None,
        "out_features": 20,
    } | change
    with pytest.raises(RuntimeError, match=re.escape(message)):
        avx2.linear_avx2(*args.values())


@pytest.mark.parametrize(
    ("w", "dtype", "message"),
    [
        (torch.randn(4, 8), torch.float32, "dtype must be bfloat16, float16 or int8"),
        (torch.randn(4, 8), torch.int8, "w must be a [out, in] tensor of int8 (for dtype int8)"),
        (torch.randn(4, 8).half(), torch.bfloat16, "got Half [4, 8] for dtype BFloat16"),
        (torch.randn(8), torch.float16, "got Float [8] for dtype Half"),
    ],
    ids=["dtype", "int8-from-float", "other-half", "1d"],
)
def test_pack_names_a_bad_weight(kernels, w, dtype, message: str) -> None:
    with pytest.raises(RuntimeError, match=re.escape(message)):
        kernels.pack_linear_avx2(w, dtype)


def _load_float32(make_checkpoint, dtype: torch.dtype, tied: bool):
    path = make_checkpoint("LlamaForCausalLM", seed=5, dtype=dtype, tie_word_embeddings=tied)
    name = str(dtype).removeprefix("torch.")
    return load_model(str(path), device="cpu", dtype=name, compute_dtype="float32")


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_a_half_checkpoint_in_float32_keeps_half_weights(
    make_checkpoint, avx2, dtype, tied
) -> None:
    loaded = _load_float32(make_checkpoint, dtype, tied)
    model = loaded.model
    assert loaded.weight_dtype == dtype and loaded.dtype == torch.float32
    ids = torch.randint(0, model.spec.vocab_size, (40,), generator=torch.Generator().manual_seed(0))
    before = prefill_logits(model, ids)
    linears = [m for m in model.modules() if isinstance(m, Linear)]
    plain = {id(m): m.weight.numel() * 4 for m in linears}

    embedding = model.model.embed_tokens
    assert embedding.weight.dtype == torch.float32
    assert (model.lm_head.weight is embedding.weight) is tied
    rows = embedding(ids)

    model.use_cpu_kernels(avx2)
    assert model.prepack(8, torch.float32, dtype) == len(linears)
    for m in linears:
        assert m._packing == "avx2" and m._packed.dtype == dtype
        assert m._packed.numel() * 2 <= plain[id(m)] // 2 + 16 * m.in_features * 2
        assert m.weight.numel() == 0  # a tied lm_head's too: the embedding has its own
    # the embedding keeps the checkpoint's dtype, and gives the same float32 rows
    assert embedding.weight.dtype == dtype
    assert torch.equal(embedding(ids), rows) and embedding(ids).dtype == torch.float32
    # the same weights and float32 arithmetic: only the order of the sums differs
    torch.testing.assert_close(prefill_logits(model, ids), before, atol=2e-5, rtol=1e-4)


def test_a_tied_table_stays_float32_while_an_unpacked_lm_head_reads_it(
    make_checkpoint, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without the native kernels, on a torch built without oneDNN, lm_head multiplies its
    plain float32 weight, the embedding's own: the table is not narrowed, so the model
    holds it once, not twice."""
    model = _load_float32(make_checkpoint, torch.bfloat16, tied=True).model
    embedding = model.model.embed_tokens
    monkeypatch.setattr(torch.backends.mkldnn, "is_available", lambda: False)
    model.prepack(8, torch.float32, torch.bfloat16)
    assert not model.lm_head.is_packed
    assert model.lm_head.weight is embedding.weight and embedding.weight.dtype == torch.float32


def test_float32_weights_stay_float32(make_checkpoint, avx2) -> None:
    path = make_checkpoint("LlamaForCausalLM", seed=5)
    model = load_model(str(path), device="cpu", dtype="float32").model
    model.use_cpu_kernels(avx2)
    model.prepack(8, torch.float32, torch.float32)
    assert {m._packing for m in model.modules() if isinstance(m, Linear)} == {"onednn"}


def test_int8_layers_of_a_float32_model_keep_their_int8_weight(make_checkpoint, avx2) -> None:
    """quantization='int8' in float32: each layer multiplies its INT8 weight on the kernel
    (a quarter of the float32 bytes), with the logits of torch's path on the same weight."""
    path = make_checkpoint("Qwen3ForCausalLM", seed=2, head_dim=32, num_key_value_heads=2)
    model = load_model(str(path), device="cpu", dtype="float32").model
    assert quantize_linears(model, "int8", skip=[model.lm_head]) > 0
    ids = torch.randint(0, model.spec.vocab_size, (23,), generator=torch.Generator().manual_seed(1))
    before = prefill_logits(model, ids)  # torch's path: the INT8 weight converted per call
    model.use_cpu_kernels(avx2)
    model.prepack(8, torch.float32, torch.float32)
    layers = [m for m in model.modules() if isinstance(m, Int8Linear)]
    for m in layers:
        assert m._packing == "avx2" and m._packed.dtype == torch.int8
        assert m.qweight.numel() == 0  # the packed copy replaced the plain one
        assert m.weight_bytes() == m._packed.numel() + m.out_features * 4
    torch.testing.assert_close(prefill_logits(model, ids), before, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
def test_int8_layer_of_a_bfloat16_model_on_the_kernel(avx2, bias: bool) -> None:
    """A bfloat16 model without AMX: activations widened to float32, the float32 sums
    rounded once to bfloat16, then the bias added (as on torch's path)."""
    q, scales = _weight(torch.int8, 40, 300, seed=6)
    b = torch.randn(40).bfloat16() if bias else None
    layer = Int8Linear(q, scales, b, "int8", matmul="avx2")
    layer.enable_cpu_kernels(avx2)
    assert layer.prepack(torch.bfloat16) and layer._packing == "avx2"
    x = torch.randn(13, 300).bfloat16()
    y = layer(x)
    assert y.dtype == torch.bfloat16 and y.shape == (13, 40)
    w = q.double() * scales.double().view(-1, 1)
    b64 = torch.zeros(40, dtype=torch.float64) if b is None else b.double()
    ref, magnitude = x.double() @ w.T + b64, x.double().abs() @ w.abs().T + b64.abs()
    unit = torch.finfo(torch.bfloat16).eps + 302 * EPS32  # two roundings of eps / 2
    assert bool(((y.double() - ref).abs() <= unit * magnitude).all())


@pytest.mark.parametrize(
    ("mode", "matmul", "dtype", "message"),
    [
        ("w8a8", "avx2", torch.float32, "matmul='avx2' multiplies float activations"),
        ("int8", "avx2", torch.float16, "matmul='avx2' needs the native CPU kernels"),
    ],
    ids=["w8a8", "float16-model"],
)
def test_avx2_matmul_refuses_what_it_cannot_do(avx2, mode, matmul, dtype, message) -> None:
    wq, ws = quantize_rows(torch.randn(32, 64))
    with pytest.raises((ValueError, RuntimeError), match=message):
        layer = Int8Linear(wq, ws.view(-1), None, mode, matmul=matmul)
        layer.enable_cpu_kernels(avx2)
        layer.prepack(dtype)


def _dequantized_checkpoint(make_checkpoint, tmp_path):
    """A float32 Qwen3 checkpoint whose projections are already INT8 values times their
    channel scales: quantization='int8' gives back exactly those INT8 values and (to a unit
    in the last place) those scales, so transformers on this checkpoint is the reference."""
    source = make_checkpoint("Qwen3ForCausalLM", seed=3, head_dim=32, num_key_value_heads=2)
    path = tmp_path / "dequantized"
    shutil.copytree(source, path)
    for file in path.glob("*.safetensors"):
        tensors = load_file(file)
        for name, w in tensors.items():
            if name.endswith("_proj.weight"):
                q, scale = quantize_rows(w)
                tensors[name] = q.float() * scale
        save_file(tensors, file, metadata={"format": "pt"})
    return path


@pytest.mark.parametrize(
    ("dtype", "quantization"),
    [("bfloat16", "none"), ("float16", "none"), ("float32", "int8")],
    ids=["bf16", "f16", "int8"],
)
def test_engine_on_the_kernel_is_token_exact_with_transformers_in_float32(
    make_checkpoint, avx2, tmp_path, dtype: str, quantization: str
) -> None:
    """Prompts of different lengths, long ones in chunks: prefill and decode rows both."""
    if quantization == "int8":
        path = _dequantized_checkpoint(make_checkpoint, tmp_path)
    else:
        path = make_checkpoint(
            "Qwen3ForCausalLM",
            seed=1,
            dtype=getattr(torch, dtype),
            head_dim=32,
            num_key_value_heads=2,
        )
    new = 10
    with GLMModel(
        str(path),
        device="cpu",
        dtype=dtype,
        compute_dtype="float32",
        quantization=quantization,
        max_num_batched_tokens=48,
        max_num_seqs=4,
    ) as model:
        lm = model.engine.loaded.model
        layer = lm.model.layers[0].mlp.down_proj
        assert layer._packing == "avx2"
        assert isinstance(layer, Int8Linear) is (quantization == "int8")
        prompts = random_prompts(lm.spec.vocab_size, [1, 6, 17, 40, 75, 130])
        results = model.generate_batch(
            prompts, SamplingParams(max_tokens=new, temperature=0, ignore_eos=True)
        )
    assert [r.token_ids for r in results] == hf_greedy(path, prompts, new)
