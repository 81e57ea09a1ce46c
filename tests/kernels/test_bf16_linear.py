"""The bfloat16-weight linear kernel (csrc/bf16_linear.cpp) against a float64 reference, and
the layers that use it: a bfloat16 checkpoint computing in float32 keeps bfloat16 weights."""

from __future__ import annotations

import pytest
import torch

from auto_glm import GLMModel, SamplingParams
from auto_glm.layers.linear import Linear
from auto_glm.loader import load_model
from tests.reference import hf_greedy, prefill_logits, random_prompts

EPS32 = torch.finfo(torch.float32).eps


@pytest.fixture(scope="module")
def avx2(kernels):
    if not kernels.bf16_avx2_available():
        pytest.skip("the kernels were built for a CPU without AVX2 and FMA")
    return kernels


def _bf16_weight(out_features: int, in_features: int, seed: int) -> torch.Tensor:
    """A float32 [out, in] weight whose values are bfloat16, as the loader leaves them."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(out_features, in_features, generator=gen).bfloat16().float()


def test_pack_puts_two_channels_in_each_pair_of_lanes(kernels) -> None:
    w = _bf16_weight(20, 3, seed=0)  # one whole panel of 16 and a panel of 4 padded with 0
    packed = kernels.pack_bf16_avx2(w)  # [panels, in, 16]
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
def test_bf16_linear_matches_float64(
    avx2, in_features: int, rows: int, out_features: int, bias: bool
) -> None:
    """Blocks of rows (216 rows of 300 inputs fill the kernel's 256 KiB, 60 of 1024) and of
    inputs (2500 = 1024 + 1024 + 452, each block's sums added to the last's)."""
    w = _bf16_weight(out_features, in_features, seed=rows)
    gen = torch.Generator().manual_seed(out_features)
    wide = torch.randn(rows, in_features + 7, generator=gen)
    x = wide[:, :in_features]  # rows with a stride wider than their width
    b = torch.randn(out_features, generator=gen) if bias else None
    y = avx2.bf16_linear_avx2(x, avx2.pack_bf16_avx2(w), b, out_features)  # [rows, out]
    assert y.shape == (rows, out_features) and y.dtype == torch.float32
    ref = x.double() @ w.double().T  # [rows, out]
    magnitude = x.double().abs() @ w.double().abs().T
    if b is not None:
        ref, magnitude = ref + b.double(), magnitude + b.double().abs()
    # the weights are exact; the float32 sums of `in` products err by at most in * eps * |.|
    assert bool(((y.double() - ref).abs() <= (in_features + 1) * EPS32 * magnitude).all())


def test_bf16_linear_keeps_nan_and_inf(avx2) -> None:
    w = _bf16_weight(16, 8, seed=3)
    x = torch.randn(3, 8)
    x[1, 2] = float("nan")
    x[2, 5] = float("inf")
    y = avx2.bf16_linear_avx2(x, avx2.pack_bf16_avx2(w), None, 16)
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
    ],
    ids=["dtype", "inputs", "outputs", "bias"],
)
def test_bf16_linear_names_a_bad_argument(avx2, change: dict, message: str) -> None:
    args = {"x": torch.randn(2, 8), "bias": None, "out_features": 20} | change
    packed = avx2.pack_bf16_avx2(_bf16_weight(20, 8, seed=4))
    with pytest.raises(RuntimeError, match=message.replace("[", r"\[")):
        avx2.bf16_linear_avx2(args["x"], packed, args["bias"], args["out_features"])


def _load_float32(make_checkpoint, tied: bool):
    path = make_checkpoint(
        "LlamaForCausalLM", seed=5, dtype=torch.bfloat16, tie_word_embeddings=tied
    )
    return path, load_model(str(path), device="cpu", dtype="bfloat16", compute_dtype="float32")


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_a_bf16_checkpoint_in_float32_keeps_bf16_weights(make_checkpoint, avx2, tied) -> None:
    _, loaded = _load_float32(make_checkpoint, tied)
    model = loaded.model
    assert loaded.weight_dtype == torch.bfloat16 and loaded.dtype == torch.float32
    ids = torch.randint(0, model.spec.vocab_size, (40,), generator=torch.Generator().manual_seed(0))
    before = prefill_logits(model, ids)
    linears = [m for m in model.modules() if isinstance(m, Linear)]
    plain = {id(m): m.weight.numel() * 4 for m in linears}

    model.use_cpu_kernels(avx2)
    assert model.prepack(8, torch.float32, torch.bfloat16) == len(linears)
    for m in linears:
        assert m._packing == "bf16" and m._packed.dtype == torch.bfloat16
        assert m._packed.numel() * 2 <= plain[id(m)] // 2 + 16 * m.in_features * 2
        assert (m.weight.numel() > 0) is (tied and m is model.lm_head)
    if tied:
        assert model.lm_head.weight is model.model.embed_tokens.weight
    # the same weights and float32 arithmetic: only the order of the sums differs
    torch.testing.assert_close(prefill_logits(model, ids), before, atol=2e-5, rtol=1e-4)


def test_float32_weights_stay_float32(make_checkpoint, avx2) -> None:
    path = make_checkpoint("LlamaForCausalLM", seed=5)
    model = load_model(str(path), device="cpu", dtype="float32").model
    model.use_cpu_kernels(avx2)
    model.prepack(8, torch.float32, torch.float32)
    assert {m._packing for m in model.modules() if isinstance(m, Linear)} == {"onednn"}


def test_engine_on_bf16_weights_is_token_exact_with_transformers_in_float32(
    make_checkpoint, avx2
) -> None:
    """Prompts of different lengths, long ones in chunks: prefill and decode rows both."""
    path = make_checkpoint(
        "Qwen3ForCausalLM", seed=1, dtype=torch.bfloat16, head_dim=32, num_key_value_heads=2
    )
    new = 10
    with GLMModel(
        str(path),
        device="cpu",
        dtype="bfloat16",
        compute_dtype="float32",
        max_num_batched_tokens=48,
        max_num_seqs=4,
    ) as model:
        lm = model.engine.loaded.model
        assert lm.lm_head._packing == "bf16"
        prompts = random_prompts(lm.spec.vocab_size, [1, 6, 17, 40, 75, 130])
        results = model.generate_batch(
            prompts, SamplingParams(max_tokens=new, temperature=0, ignore_eos=True)
        )
    assert [r.token_ids for r in results] == hf_greedy(path, prompts, new)
