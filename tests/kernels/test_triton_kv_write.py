"""The Triton K/V write (auto_glm.kernels.triton.kv_write) against the attention layer's
``index_copy_``s. Without a CUDA GPU it runs in triton's interpreter (tests/conftest.py sets
TRITON_INTERPRET=1)."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed (pip install 'open-autoglm[gpu]')")

from auto_glm.kernels.triton import fused_kernels  # noqa: E402
from auto_glm.layers.attention import Attention  # noqa: E402
from tests.triton_env import require_triton_interpreter  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture(autouse=True)
def _runs_here() -> None:
    if DEVICE.type == "cpu":
        require_triton_interpreter()


def _layer(dtype: torch.dtype, slots: int, fused: bool) -> Attention:
    layer = Attention(4, 2, 48, 48**-0.5)
    layer.allocate_cache(slots, dtype, device=DEVICE)
    layer.k_cache.fill_(float("nan"))  # every slot not written stays NaN
    layer.v_cache.fill_(float("nan"))
    if fused:
        layer.enable_kernels(fused_kernels(dtype))
    return layer


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("slot_dtype", [torch.int64, torch.int32])
def test_k_and_v_land_in_their_slots_as_index_copy_puts_them(
    dtype: torch.dtype, slot_dtype: torch.dtype
) -> None:
    torch.manual_seed(0)
    tokens, kv_heads, dim = 5, 2, 48  # head dim off a power of two
    qkv = torch.randn(tokens, (4 + 2 * kv_heads) * dim).to(DEVICE, dtype)
    _, k, v = qkv.split([4 * dim, kv_heads * dim, kv_heads * dim], dim=-1)
    k, v = k.view(tokens, kv_heads, dim), v.view(tokens, kv_heads, dim)  # strided views
    slots = torch.tensor([7, 0, 31, 12, 13], dtype=slot_dtype, device=DEVICE)
    plain, fused = _layer(dtype, 32, fused=False), _layer(dtype, 32, fused=True)
    plain._write(slots.long(), k, v)
    fused._write(slots, k, v)
    for got, want in ((fused.k_cache, plain.k_cache), (fused.v_cache, plain.v_cache)):
        assert torch.equal(got.isnan(), want.isnan())
        assert torch.equal(got.nan_to_num(), want.nan_to_num())
    assert torch.equal(fused.k_cache[31], k[2]) and torch.equal(fused.v_cache[0], v[1])


def test_a_slot_outside_the_cache_is_not_written() -> None:
    k = torch.ones(2, 2, 48, dtype=torch.bfloat16, device=DEVICE)
    layer = _layer(torch.bfloat16, 8, fused=True)
    layer._write(torch.tensor([8, -1], device=DEVICE), k, k)
    assert bool(layer.k_cache.isnan().all()) and bool(layer.v_cache.isnan().all())


def test_a_quantized_cache_keeps_the_torch_write() -> None:
    """The kernel copies values: an int8 cache, whose scales are computed as it is written,
    takes the layer's torch path."""
    layer = Attention(4, 2, 48, 48**-0.5)
    layer.allocate_cache(8, torch.bfloat16, "int8", DEVICE)
    layer.enable_kernels(fused_kernels(torch.bfloat16))
    x = torch.randn(3, 2, 48, dtype=torch.bfloat16, device=DEVICE)
    layer._write(torch.tensor([1, 2, 3], device=DEVICE), x, x)
    assert layer.k_cache.dtype == torch.int8
    assert bool((layer.k_scale[1:4] > 0).all()) and not bool(layer.k_scale[0].any())


def test_bad_arguments_are_refused() -> None:
    write_kv = fused_kernels(torch.bfloat16).write_kv
    k = torch.ones(2, 2, 48, dtype=torch.bfloat16, device=DEVICE)
    cache = torch.zeros(8, 2, 48, dtype=torch.bfloat16, device=DEVICE)
    slots = torch.tensor([0, 1], device=DEVICE)
    with pytest.raises(ValueError, match=r"v must be \[T, H_kv, D\]"):
        write_kv(k, k[:1], cache, cache, slots)
    with pytest.raises(ValueError, match=r"k_cache must be \[num_slots, 2, 48\] torch.bfloat16"):
        write_kv(k, k, cache.half(), cache, slots)
    with pytest.raises(ValueError, match=r"slots must be \[2\] int32 or int64"):
        write_kv(k, k, cache, cache, slots.float())
