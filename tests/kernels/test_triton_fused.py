"""The fused Triton RMSNorm and SiLU-and-multiply kernels (auto_glm.kernels.triton.fused)
against the layers' torch path, which rounds like the reference models. Without a CUDA GPU
they run in triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1)."""

from __future__ import annotations

import collections
import os
import subprocess
import sys

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

pytest.importorskip("triton", reason="triton is not installed (pip install 'open-autoglm[gpu]')")

from triton.runtime.interpreter import InterpretedFunction  # noqa: E402

from auto_glm.kernels.triton import fused_kernels  # noqa: E402
from auto_glm.layers.attention import AttentionMetadata, PrefillChunk, attention_metadata  # noqa: E402
from auto_glm.layers.attention_backends.triton import TritonBackend  # noqa: E402
from auto_glm.layers.linear import SiluAndMul  # noqa: E402
from auto_glm.layers.norm import RMSNorm  # noqa: E402
from auto_glm.layers.rotary import MRotaryEmbedding, RopeSpec, RotaryEmbedding  # noqa: E402
from auto_glm.loader import load_model  # noqa: E402
from auto_glm.platforms.base import platform_for  # noqa: E402
from tests.triton_env import require_triton_interpreter  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
HALF = [torch.bfloat16, torch.float16]
# bfloat16 arithmetic asked for: a CPU without it (no AVX512_BF16 or AMX) computes in float32
BF16_MATH = {"dtype": "bfloat16", "compute_dtype": "bfloat16"}


@pytest.fixture(autouse=True)
def _runs_here() -> None:
    if DEVICE.type == "cpu":
        require_triton_interpreter()


def _ulps(dtype: torch.dtype) -> dict[str, float]:
    """One unit in the last place of ``dtype``: a float32 sum taken in another order may
    move a rounding to the neighbouring value, never further."""
    return {"rtol": torch.finfo(dtype).eps, "atol": torch.finfo(dtype).tiny}


def _norms(width: int, dtype: torch.dtype) -> tuple[RMSNorm, RMSNorm]:
    plain, fused = RMSNorm(width, 1e-6), RMSNorm(width, 1e-6)
    with torch.no_grad():
        plain.weight.copy_(torch.randn(width))
        fused.weight.copy_(plain.weight)
    fused.enable_kernels(fused_kernels(dtype))
    return plain.to(DEVICE, dtype), fused.to(DEVICE, dtype)


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("width", [96, 768])  # off and on a power of two
def test_rms_norm_with_and_without_residual(dtype: torch.dtype, width: int) -> None:
    torch.manual_seed(width)
    plain, fused = _norms(width, dtype)
    wide = (torch.randn(5, width + 32) * 3).to(DEVICE, dtype)
    x = wide[:, :width]  # rows with a stride wider than their width
    residual = torch.randn(5, width).to(DEVICE, dtype)
    with torch.no_grad():
        torch.testing.assert_close(fused(x), plain(x), **_ulps(dtype))
        want_out, want_residual = plain(x, residual)
        got_residual = residual.clone()
        out, new_residual = fused(x, got_residual)
    assert new_residual.data_ptr() == got_residual.data_ptr()  # the sum is written in place
    torch.testing.assert_close(new_residual, want_residual, rtol=0, atol=0)  # one rounding
    torch.testing.assert_close(out, want_out, **_ulps(dtype))


@pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")  # silu(-100)
@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("width", [48, 1100])  # one program per row, and two
def test_silu_and_mul(dtype: torch.dtype, width: int) -> None:
    torch.manual_seed(width)
    plain, fused = SiluAndMul(), SiluAndMul()
    fused.enable_kernels(fused_kernels(dtype))
    x = (torch.randn(3, 2 * width) * 4).to(DEVICE, dtype)
    x[0, :4] = torch.tensor([-100.0, 100.0, 0.0, float("nan")])  # saturation, zero, NaN
    got, want = fused(x), plain(x)
    assert bool(torch.isnan(got[0, 3]))
    torch.testing.assert_close(got, want, equal_nan=True, **_ulps(dtype))


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize(
    ("interleaved", "rotary_dim"),
    [(False, 64), (True, 64), (False, 32), (True, 32)],  # Llama/Qwen, GLM; whole and partial
)
def test_rotary_of_q_and_k_in_place(dtype: torch.dtype, interleaved: bool, rotary_dim: int) -> None:
    torch.manual_seed(rotary_dim + interleaved)
    heads, kv_heads, dim, tokens = 4, 2, 64, 5
    spec = RopeSpec(theta=10000.0, rotary_dim=rotary_dim, max_position=64, interleaved=interleaved)
    plain, fused = RotaryEmbedding(spec).to(DEVICE), RotaryEmbedding(spec).to(DEVICE)
    fused.enable_kernels(fused_kernels(dtype).rotary)
    positions = torch.tensor([0, 3, 17, 40, 63], device=DEVICE)
    rope = plain.cos_sin(positions, dtype)
    # q and k as the attention layer has them: strided views into one q|k|v projection
    qkv = (torch.randn(tokens, (heads + 2 * kv_heads) * dim) * 2).to(DEVICE, dtype)
    want = qkv.clone()
    for buffer, rotary in ((want, plain), (qkv, fused)):
        q, k, _ = buffer.split([heads * dim, kv_heads * dim, kv_heads * dim], dim=-1)
        rotary(rope, q.view(tokens, heads, dim), k.view(tokens, kv_heads, dim))
    # the same roundings in the same order: equal, but for the bit-wise bfloat16 rounding of
    # the interpreter against torch's
    torch.testing.assert_close(qkv, want, **_ulps(dtype))
    v = slice((heads + kv_heads) * dim, None)
    assert torch.equal(qkv[:, v], want[:, v])  # v untouched
    if rotary_dim < dim:  # the dims past rotary_dim pass through
        assert torch.equal(qkv[:, rotary_dim:dim], want[:, rotary_dim:dim])


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize(("interleaved", "rotary_dim"), [(False, 64), (True, 32), (False, 32)])
def test_q_and_k_norms_with_the_rotary_in_one_launch(
    dtype: torch.dtype, interleaved: bool, rotary_dim: int
) -> None:
    """Qwen3 normalises each head of q and k, then rotates them: given the norms, the rotary
    kernel does both in place, and the dims past a partial rotary are normalised too."""
    torch.manual_seed(rotary_dim + interleaved)
    heads, kv_heads, dim, tokens = 4, 2, 64, 5
    spec = RopeSpec(theta=10000.0, rotary_dim=rotary_dim, max_position=64, interleaved=interleaved)
    plain, fused = RotaryEmbedding(spec).to(DEVICE), RotaryEmbedding(spec).to(DEVICE)
    fused.enable_kernels(fused_kernels(dtype).rotary)
    q_norm, _ = _norms(dim, dtype)  # both on torch's path
    k_norm, _ = _norms(dim, dtype)
    rope = plain.cos_sin(torch.tensor([0, 3, 17, 40, 63], device=DEVICE), dtype)
    qkv = (torch.randn(tokens, (heads + 2 * kv_heads) * dim) * 3).to(DEVICE, dtype)
    qkv[2, :dim] *= 50  # one head far louder than the rest
    got_qkv = qkv.clone()
    views = []
    for buffer in (qkv, got_qkv):
        q, k, _ = buffer.split([heads * dim, kv_heads * dim, kv_heads * dim], dim=-1)
        views.append((q.view(tokens, heads, dim), k.view(tokens, kv_heads, dim)))
    with torch.no_grad():
        want_q, want_k = plain(rope, *views[0], (q_norm, k_norm))
        got_q, got_k = fused(rope, *views[1], (q_norm, k_norm))
    assert got_q.data_ptr() == views[1][0].data_ptr()  # in place, in the projection
    torch.testing.assert_close(got_q, want_q, **_ulps(dtype))
    torch.testing.assert_close(got_k, want_k, **_ulps(dtype))
    v = slice((heads + kv_heads) * dim, None)
    assert torch.equal(got_qkv[:, v], qkv[:, v])  # v untouched


def test_mrope_rotates_through_the_kernel() -> None:
    """M-RoPE's cos/sin (each frequency's angle from its section's row) come contiguous, so
    the layer rotates through the kernel, with the torch rotation's result; a decode step's
    one row of positions gives what three equal rows give."""
    spec = RopeSpec(theta=10000.0, rotary_dim=16, max_position=64, interleaved=True)
    plain, fused = MRotaryEmbedding(spec, [2, 3, 3]), MRotaryEmbedding(spec, [2, 3, 3])
    plain, fused = plain.to(DEVICE), fused.to(DEVICE)
    calls = []
    rotate = fused_kernels(torch.bfloat16).rotary
    fused.enable_kernels(lambda *args: calls.append(1) or rotate(*args))
    positions = torch.tensor([[0, 1, 2], [0, 4, 5], [0, 6, 2]], device=DEVICE)  # [3, T]
    rope = plain.cos_sin(positions, torch.bfloat16)
    assert rope[0].is_contiguous() and rope[0].shape == (3, 1, 8)
    q = torch.randn(3, 2, 16).to(DEVICE, torch.bfloat16)
    k = torch.randn(3, 1, 16).to(DEVICE, torch.bfloat16)
    want_q, want_k, got_q, got_k = q.clone(), k.clone(), q.clone(), k.clone()
    plain(rope, want_q, want_k)
    fused(rope, got_q, got_k)
    assert calls == [1]
    torch.testing.assert_close(got_q, want_q, **_ulps(torch.bfloat16))
    torch.testing.assert_close(got_k, want_k, **_ulps(torch.bfloat16))
    assert not torch.equal(got_q, q)  # rotated
    one_row = torch.tensor([7, 0, 63], device=DEVICE)
    for got, want in zip(
        plain.cos_sin(one_row, torch.float32),
        plain.cos_sin(one_row.expand(3, -1), torch.float32),
        strict=True,
    ):
        assert torch.equal(got, want)


def test_empty_batch_and_bad_arguments() -> None:
    kernels = fused_kernels(torch.bfloat16)
    weight = torch.ones(8, dtype=torch.bfloat16, device=DEVICE)
    x = torch.empty(0, 8, dtype=torch.bfloat16, device=DEVICE)
    kernels.rms_norm(x, weight, 1e-6, torch.empty_like(x))  # nothing to do, no launch
    with pytest.raises(ValueError, match="out must be a contiguous"):
        kernels.rms_norm(torch.ones(2, 8, dtype=torch.bfloat16, device=DEVICE), weight, 1e-6, x)
    with pytest.raises(ValueError, match="weight must be a contiguous \\[16\\]"):
        y = torch.ones(2, 16, dtype=torch.bfloat16, device=DEVICE)
        kernels.rms_norm(y, weight, 1e-6, torch.empty_like(y))
    q = torch.ones(2, 2, 8, dtype=torch.bfloat16, device=DEVICE)
    cos = torch.ones(2, 1, 4, dtype=torch.bfloat16, device=DEVICE)
    with pytest.raises(ValueError, match=r"k's norm weight must be a contiguous \[8\] torch.bf"):
        kernels.rotary(q, q.clone(), cos, cos, False, (weight, weight.float(), 1e-6))


def test_float32_models_keep_torch_paths() -> None:
    """float32 models stay on torch's kernels, which keep them token-exact with transformers."""
    assert fused_kernels(torch.float32) is None
    assert platform_for("cpu").fused_kernels(torch.bfloat16) is None  # the CPU has its own


def _logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """ids [T] -> logits [T, vocab]: one prefill over a scratch KV cache."""
    for attn in model.attention_layers():
        attn.allocate_cache(len(ids), torch.bfloat16, "auto", DEVICE)
    slots = torch.arange(len(ids), device=DEVICE)
    md = AttentionMetadata(slot_mapping=slots, prefills=[PrefillChunk(0, len(ids), slots)])
    with torch.inference_mode(), attention_metadata(md):
        return model.compute_logits(model(ids, torch.arange(len(ids), device=DEVICE)))


@pytest.mark.parametrize("arch", ["Qwen3ForCausalLM", "GlmForCausalLM"])  # GLM: half interleaved
def test_a_half_precision_model_through_the_fused_kernels(make_checkpoint, arch: str) -> None:
    """Every norm, activation and the rotary embedding of a model take them
    (use_fused_kernels), and its logits stay those of the torch path up to a rounding here
    and there."""
    path = make_checkpoint(arch)
    plain = load_model(path, device="cpu", **BF16_MATH).model.to(DEVICE)
    fused = load_model(path, device="cpu", **BF16_MATH).model.to(DEVICE)
    fused.use_fused_kernels(fused_kernels(torch.bfloat16))
    layers = [m for m in fused.modules() if isinstance(m, (RMSNorm, SiluAndMul))]
    assert layers and all(m._kernels is not None for m in layers)
    assert fused.language_model().rotary_emb._rotate is not None
    ids = torch.tensor([3, 14, 15, 92, 65, 35], device=DEVICE)
    want, got = _logits(plain, ids).double(), _logits(fused, ids).double()
    assert torch.equal(got.argmax(-1), want.argmax(-1))
    assert bool((torch.nn.functional.cosine_similarity(got, want, dim=-1) > 0.999).all())


class _Launches(TorchDispatchMode):
    """The kernels a forward pass launches: aten ops that compute (not views nor bare
    allocations) and Triton kernels, these counted at their launch in triton's interpreter,
    whose own tensor work is not counted."""

    ALLOCATIONS = frozenset({"empty", "empty_like", "empty_strided", "new_empty"})

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        super().__init__()
        self.kernels: collections.Counter[str] = collections.Counter()
        self._in_triton = False
        launch = InterpretedFunction.run

        def counted(fn, *args, **kwargs):
            self.kernels[fn.fn.__name__] += 1
            self._in_triton = True
            try:
                return launch(fn, *args, **kwargs)
            finally:
                self._in_triton = False

        monkeypatch.setattr(InterpretedFunction, "run", counted)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.__name__.split(".")[0]
        if not (self._in_triton or func.is_view or name in self.ALLOCATIONS):
            self.kernels[name] += 1
        return func(*args, **(kwargs or {}))


def test_a_decode_step_launches_ten_kernels_a_layer(make_checkpoint, monkeypatch) -> None:
    """A bfloat16 Qwen3 decode step on the GPU path (Triton attention, fused kernels), as a
    CUDA graph replays it: per layer the 4 projections, 2 norms (input, and post-attention
    with its residual add), the q and k norms with the rotary, the K and V write, attention
    and SiLU-and-multiply; then the final norm and lm_head. torch's q and k norms took four
    kernels each (upcast, norm, downcast, scale), and its K and V writes one each."""
    require_triton_interpreter()
    model = load_model(make_checkpoint("Qwen3ForCausalLM"), **BF16_MATH).model
    model.use_fused_kernels(fused_kernels(torch.bfloat16))
    backend = TritonBackend()
    model.set_attention_backend(backend)
    batch, block = 3, 4
    for attn in model.attention_layers():
        attn.allocate_cache(batch * 2 * block, torch.bfloat16)
    tables = torch.arange(batch * 2, dtype=torch.int32).view(batch, 2)
    lens = torch.tensor([3, 5, 8], dtype=torch.int32)
    slots = (tables[:, 0] * block + lens - 1).long()  # each sequence's newest position
    metadata = backend.decode_metadata(slots, tables, lens, block)
    model.language_model().rotary_emb.reserve(16)  # as before a graph's capture
    layers = len(model.attention_layers())
    ids, positions = torch.tensor([5, 6, 7]), (lens - 1).long()
    with torch.inference_mode(), attention_metadata(metadata), _Launches(monkeypatch) as step:
        model.compute_logits(model(ids, positions))
    per_layer = {
        "linear": 4, "_rms_norm_kernel": 2, "_rotary_kernel": 1, "_write_kv_kernel": 1,
        "decode_kernel": 1, "_silu_and_mul_kernel": 1,
    }  # fmt: skip
    # the step's own: embedding, cos and sin of the positions, final norm and lm_head
    step_once = {"embedding": 1, "index_select": 1, "_rms_norm_kernel": 1, "linear": 1}
    want = collections.Counter({k: v * layers for k, v in per_layer.items()})
    want.update(step_once)
    assert step.kernels == want, dict(step.kernels)
    assert sum(per_layer.values()) == 10


COMPILE_FOR_SM90 = """
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from auto_glm.kernels.triton import fused, kv_write

target = GPUTarget("cuda", 90, 32)
for ptr in ("*bf16", "*fp16"):
    for add in (True, False):
        names = ("x_ptr", "res_ptr", "w_ptr", "out_ptr")
        signature = {**dict.fromkeys(names, ptr), "x_stride": "i64", "width": "i32", "eps": "fp32"}
        constexprs = {"ADD": add, "BITWISE": False, "BLOCK": 1024}
        signature.update(dict.fromkeys(constexprs, "constexpr"))
        triton.compile(ASTSource(fused._rms_norm_kernel, signature, constexprs), target=target)
    signature = {"x_ptr": ptr, "out_ptr": ptr, "x_stride": "i64", "width": "i32"}
    constexprs = {"BITWISE": False, "BLOCK": 1024}
    signature.update(dict.fromkeys(constexprs, "constexpr"))
    source = ASTSource(fused._silu_and_mul_kernel, signature, constexprs)
    compiled = triton.compile(source, target=target)
    assert "cvt.rn" in compiled.asm["ptx"]  # the hardware's round-to-nearest conversion
    names = ("q_ptr", "k_ptr", "cos_ptr", "sin_ptr", "q_weight_ptr", "k_weight_ptr")
    signature = {**dict.fromkeys(names, ptr), "eps": "fp32"}
    strides = ("q_token_stride", "q_head_stride", "k_token_stride", "k_head_stride", "cos_stride")
    signature.update(dict.fromkeys(strides, "i64"), num_q_heads="i32", head_dim="i32")
    for interleaved, norm in ((True, False), (False, False), (False, True), (True, True)):
        constexprs = {"HALF": 32, "BLOCK": 32, "BLOCK_D": 128, "INTERLEAVED": interleaved,
                      "NORM": norm, "BITWISE": False}
        signature.update(dict.fromkeys(constexprs, "constexpr"))
        source = ASTSource(fused._rotary_kernel, signature, constexprs)
        ptx = triton.compile(source, target=target, options=fused.ROTARY_LAUNCH).asm["ptx"]
        # each product rounded, then the sum, as torch's rotation does: no half-precision fma
        assert "fma.rn.bf16" not in ptx and "fma.rn.f16" not in ptx, ptr
    names = ("k_ptr", "v_ptr", "k_cache_ptr", "v_cache_ptr")
    signature = {**dict.fromkeys(names, ptr), "slots_ptr": "*i64", "num_slots": "i32"}
    strides = ("k_token_stride", "k_head_stride", "v_token_stride", "v_head_stride",
               "cache_slot_stride", "cache_head_stride", "head_dim")
    signature.update(dict.fromkeys(strides, "i32"), BLOCK_D="constexpr")
    source = ASTSource(kv_write._write_kv_kernel, signature, {"BLOCK_D": 128})
    triton.compile(source, target=target, options={"num_warps": 1})
print("compiled")
"""


def test_the_kernels_compile_for_an_h100_without_one() -> None:
    """The GPU build (not the interpreter's): PTX and ptxas for sm_90, in a process without
    TRITON_INTERPRET, so that a kernel the interpreter accepts but the compiler refuses fails
    here rather than on a lent GPU."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run(
        [sys.executable, "-c", COMPILE_FOR_SM90],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    if done.returncode and "ptxas" in done.stderr and "not found" in done.stderr.lower():
        pytest.skip("triton's bundled ptxas is missing here")
    assert done.returncode == 0 and "compiled" in done.stdout, done.stderr[-2000:]
