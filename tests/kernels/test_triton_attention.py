"""The Triton paged attention kernels (auto_glm.kernels.triton) against a float64 reference
computed from the same paged cache, and against the native CPU decode kernel. Without a CUDA
GPU they run in triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1), so
the cases are small."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed (pip install 'open-autoglm[gpu]')")

from auto_glm.kernels import triton as triton_kernels  # noqa: E402
from auto_glm.kernels.triton import checks, paged_attention  # noqa: E402
from auto_glm.layers.kv_quant import dequantize_kv, quantize_kv  # noqa: E402
from tests.kernels.test_paged_attention import _paged_case, _reference  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
if DEVICE.type == "cpu" and not checks.INTERPRETED:
    pytest.skip(
        "the Triton kernels were imported before TRITON_INTERPRET=1 was set, and there is no "
        "CUDA GPU to compile them for",
        allow_module_level=True,
    )

FP8 = torch.float8_e4m3fn
TOL = {
    torch.float32: {"atol": 2e-5, "rtol": 1e-4},
    torch.bfloat16: {"atol": 2e-2, "rtol": 2e-2},
    torch.float16: {"atol": 4e-3, "rtol": 4e-3},
}


def _decode(q, kc, vc, tables, lens, block_size, scale, k_scale=None, v_scale=None, **kwargs):
    """The Triton decode on DEVICE; the output comes back to the CPU as float64."""
    args = [t.to(DEVICE) for t in (q, kc, vc, tables, lens)]
    scales = [None if s is None else s.to(DEVICE) for s in (k_scale, v_scale)]
    out = torch.full_like(args[0], float("nan"))
    triton_kernels.paged_decode_attention(*args, block_size, scale, out, *scales, **kwargs)
    return out.cpu().double()


def _prefill_case(head_dim, group, kv_heads, block_size, chunks, dtype, seed=0):
    """``chunks`` (cached prefix, chunk length) in one step: caches with each sequence's
    blocks scattered (shuffled ids), block tables padded with an extra column, packed
    queries as a strided view of a wider tensor."""
    g = torch.Generator().manual_seed(seed)
    seq_lens = [prefix + length for prefix, length in chunks]
    num_blocks = sum(-(-n // block_size) for n in seq_lens) + 2
    shape = (num_blocks * block_size, kv_heads, head_dim)  # [slots, H_kv, D]
    k_cache = torch.randn(shape, generator=g).to(dtype)
    v_cache = torch.randn(shape, generator=g).to(dtype)
    order = torch.randperm(num_blocks, generator=g).tolist()
    tables = []
    for n in seq_lens:
        count = -(-n // block_size)
        tables.append(order[:count])
        order = order[count:]
    width = max(len(t) for t in tables) + 1
    padded = torch.tensor([t + [order[0]] * (width - len(t)) for t in tables])
    heads = kv_heads * group
    tokens = sum(length for _, length in chunks)
    fused = torch.randn(tokens, heads * head_dim + 24, generator=g).to(dtype)
    q = fused[:, : heads * head_dim].view(tokens, heads, head_dim)  # [T, H, D]
    starts = torch.tensor([0] + [length for _, length in chunks]).cumsum(0)
    return q, k_cache, v_cache, starts, torch.tensor(seq_lens), padded, tables


def _prefill_reference(q, k_cache, v_cache, chunks, tables, block_size, scale):
    """Causal, bottom-right aligned attention of each chunk over its whole sequence."""
    group = q.shape[1] // k_cache.shape[1]
    out, start = [], 0
    for (prefix, length), table in zip(chunks, tables, strict=True):
        n = prefix + length
        slots = torch.tensor(
            [table[t // block_size] * block_size + t % block_size for t in range(n)]
        )
        k = k_cache[slots].double().repeat_interleave(group, 1)  # [n, H, D]
        v = v_cache[slots].double().repeat_interleave(group, 1)
        qc = q[start : start + length].double() * scale  # [L, H, D]
        scores = torch.einsum("lhd,nhd->hln", qc, k)
        visible = torch.arange(n)[None, :] <= prefix + torch.arange(length)[:, None]  # [L, n]
        weights = scores.masked_fill(~visible, float("-inf")).softmax(-1)
        out.append(torch.einsum("hln,nhd->lhd", weights, v))
        start += length
    return torch.cat(out)


def _prefill(q, kc, vc, starts, seq_lens, tables, block_size, scale, k_scale=None, v_scale=None):
    args = [t.to(DEVICE) for t in (q, kc, vc, starts, seq_lens, tables)]
    scales = [None if s is None else s.to(DEVICE) for s in (k_scale, v_scale)]
    out = torch.full_like(args[0], float("nan"))
    triton_kernels.paged_prefill_attention(*args, block_size, scale, out, *scales)
    return out.cpu().double()


def _quantize(cache, storage):
    """A cache quantized to ``storage``: (values, bfloat16 scales, the dequantized float64
    cache that the reference reads)."""
    values, scales = quantize_kv(cache, storage)  # [slots, H_kv, D], [slots, H_kv]
    return values, scales, dequantize_kv(values, scales, torch.float64)


DECODE_LENS = [1, 15, 16, 17, 70]


@pytest.mark.parametrize("head_dim", [64, 80, 96, 128, 256])
def test_decode_matches_reference_for_head_dims(head_dim):
    q, kc, vc, tables, lens_t, rows = _paged_case(head_dim, 4, 2, 16, DECODE_LENS, torch.float32)
    out = _decode(q, kc, vc, tables, lens_t, 16, head_dim**-0.5)
    expected = _reference(q, kc, vc, rows, DECODE_LENS, 16, head_dim**-0.5)
    torch.testing.assert_close(out, expected, **TOL[torch.float32])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize(("group", "kv_heads", "block_size"), [(1, 4, 16), (4, 2, 8), (8, 1, 32)])
def test_decode_groups_block_sizes_and_dtypes(dtype, group, kv_heads, block_size):
    q, kc, vc, tables, lens_t, rows = _paged_case(
        96, group, kv_heads, block_size, DECODE_LENS, dtype, 1
    )
    out = _decode(q, kc, vc, tables.int(), lens_t.int(), block_size, 0.1)
    expected = _reference(q, kc, vc, rows, DECODE_LENS, block_size, 0.1)
    torch.testing.assert_close(out, expected, **TOL[dtype])


@pytest.mark.parametrize("num_splits", [2, 3, 7])
def test_decode_split_k_matches_one_pass(num_splits):
    """Splits past a short context's end hold nothing and must weigh nothing."""
    lens = [1, 30, 90, 200]
    q, kc, vc, tables, lens_t, rows = _paged_case(80, 4, 2, 16, lens, torch.float32, seed=2)
    out = _decode(q, kc, vc, tables, lens_t, 16, 0.11, num_splits=num_splits)
    torch.testing.assert_close(
        out, _reference(q, kc, vc, rows, lens, 16, 0.11), **TOL[torch.float32]
    )


@pytest.mark.parametrize(
    ("block_n", "num_warps", "num_stages", "heads_first", "num_splits"),
    [(16, 4, 1, True, None), (64, 4, 2, False, 3), (128, 8, 4, True, 2)],
)
def test_decode_tilings_match_reference(block_n, num_warps, num_stages, heads_first, num_splits):
    """Tiles of other key counts (also spanning several blocks, or past a split's end) and
    the KV head as the grid's first axis give the same attention; warps and stages change
    only how it runs."""
    lens = [1, 30, 90, 200]
    q, kc, vc, tables, lens_t, rows = _paged_case(64, 4, 2, 16, lens, torch.float32, seed=4)
    tiles = triton_kernels.DecodeTiles(block_n, num_warps, num_stages, heads_first)
    out = _decode(q, kc, vc, tables, lens_t, 16, 0.11, num_splits=num_splits, tiles=tiles)
    torch.testing.assert_close(
        out, _reference(q, kc, vc, rows, lens, 16, 0.11), **TOL[torch.float32]
    )


@pytest.mark.parametrize(
    ("head_dim", "group", "kv_heads", "block_n", "num_splits", "dtype"),
    [
        (64, 2, 8, 2, None, torch.float32),  # the nano model's heads: 16 rows a tile
        (128, 2, 8, 4, 3, torch.bfloat16),
        (80, 4, 2, 8, None, torch.float32),  # a padded head dim
        (64, 1, 4, 16, 2, torch.float16),
        (96, 8, 1, 32, None, torch.float32),  # one KV head: rows are keys
        (64, 3, 2, 8, 7, torch.float32),  # 6 query heads, padded to 16 rows of scores
    ],
)
def test_decode_with_packed_heads_matches_reference(
    head_dim, group, kv_heads, block_n, num_splits, dtype
):
    """One program for all KV heads of a sequence: every query head attends only to its own
    KV head's keys, over tiles that span blocks and splits past a context's end."""
    lens = [1, 15, 16, 17, 70, 200]
    q, kc, vc, tables, lens_t, rows = _paged_case(
        head_dim, group, kv_heads, 16, lens, dtype, seed=5
    )
    tiles = triton_kernels.DecodeTiles(block_n, 4, 2, packed_heads=True)
    out = _decode(q, kc, vc, tables, lens_t, 16, 0.12, num_splits=num_splits, tiles=tiles)
    torch.testing.assert_close(out, _reference(q, kc, vc, rows, lens, 16, 0.12), **TOL[dtype])


def test_packed_heads_refuse_what_they_cannot_tile():
    q, kc, vc, tables, lens_t, _ = _paged_case(64, 2, 2, 16, [5, 9], torch.float32, seed=6)
    out = torch.empty_like(q)
    args = [t.to(DEVICE) for t in (q, kc, vc, tables, lens_t)]
    few = triton_kernels.DecodeTiles(4, packed_heads=True)  # 4 keys x 2 KV heads = 8 rows
    with pytest.raises(ValueError, match=r"4 keys x 2 KV heads = 8 rows, which must be a power"):
        triton_kernels.paged_decode_attention(*args, 16, 0.1, out.to(DEVICE), tiles=few)
    values, scales, _ = _quantize(kc, torch.int8)
    quantized = [args[0], values.to(DEVICE), values.to(DEVICE), *args[3:]]
    packed = triton_kernels.DecodeTiles(8, packed_heads=True)
    with pytest.raises(ValueError, match=r"packed_heads=True\) reads float caches only"):
        triton_kernels.paged_decode_attention(
            *quantized, 16, 0.1, out.to(DEVICE), scales.to(DEVICE), scales.to(DEVICE), tiles=packed
        )


@pytest.mark.parametrize(
    ("options", "named"),
    [
        ({"block_n": 48}, "block_n=48 must be a power of two from 16 to 256"),
        ({"block_n": 3, "packed_heads": True}, "block_n=3 must be a power of two from 1 to 256"),
        ({"heads_first": True, "packed_heads": True}, "with packed_heads one program holds"),
        ({"block_n": 8}, "block_n=8"),
        ({"num_warps": 3}, "num_warps=3 must be a power of two from 1 to 32"),
        ({"num_stages": 0}, "num_stages=0 must be at least 1"),
    ],
)
def test_bad_decode_tiles_are_refused_by_name(options, named):
    with pytest.raises(ValueError, match=named):
        triton_kernels.DecodeTiles(**options)


def test_decode_splits_only_a_small_batch_of_long_tables():
    assert paged_attention._decode_splits(programs=8, capacity=256) == 1
    assert paged_attention._decode_splits(programs=8, capacity=4096) == 16
    assert paged_attention._decode_splits(programs=64, capacity=1 << 20) == 4
    assert paged_attention._decode_splits(programs=512, capacity=1 << 20) == 1


def test_decode_matches_the_native_cpu_kernel(kernels):
    lens = [3, 17, 64, 129]
    q, kc, vc, tables, lens_t, _ = _paged_case(128, 4, 2, 16, lens, torch.float32, seed=3)
    native = torch.full_like(q, float("nan"))
    kernels.paged_decode_attention(q, kc, vc, tables, lens_t, 16, 128**-0.5, native)
    out = _decode(q, kc, vc, tables, lens_t, 16, 128**-0.5)
    torch.testing.assert_close(out, native.double(), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("storage", [torch.int8, FP8], ids=["int8", "fp8"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_over_a_quantized_cache(storage, dtype):
    q, kc, vc, tables, lens_t, rows = _paged_case(80, 4, 2, 16, DECODE_LENS, torch.float32, 4)
    kq, ks, k64 = _quantize(kc * 3, storage)
    vq, vs, v64 = _quantize(vc, storage)
    q = q.to(dtype)
    out = _decode(q, kq, vq, tables, lens_t, 16, 0.1, ks, vs)
    torch.testing.assert_close(
        out, _reference(q, k64, v64, rows, DECODE_LENS, 16, 0.1), **TOL[dtype]
    )


PREFILL_CHUNKS = [(0, 5), (37, 20), (16, 1), (3, 70), (0, 33)]


@pytest.mark.parametrize(
    ("head_dim", "group", "kv_heads", "dtype"),
    [
        (64, 1, 2, torch.float32),
        (80, 4, 1, torch.float32),
        (96, 8, 1, torch.bfloat16),
        (128, 4, 1, torch.float16),
        (256, 2, 2, torch.bfloat16),
    ],
)
def test_prefill_matches_reference(head_dim, group, kv_heads, dtype):
    """Chunks from position 0 and after a cached prefix, of lengths 1 to past one query tile,
    in one launch."""
    case = _prefill_case(head_dim, group, kv_heads, 16, PREFILL_CHUNKS, dtype, seed=head_dim)
    q, kc, vc, starts, seq_lens, tables, rows = case
    out = _prefill(q, kc, vc, starts.int(), seq_lens, tables, 16, head_dim**-0.5)
    expected = _prefill_reference(q, kc, vc, PREFILL_CHUNKS, rows, 16, head_dim**-0.5)
    torch.testing.assert_close(out, expected, **TOL[dtype])


@pytest.mark.parametrize("block_size", [1, 8, 32])
def test_prefill_block_sizes_and_a_single_chunk(block_size):
    chunks = [(block_size + 3, 9)]
    q, kc, vc, starts, seq_lens, tables, rows = _prefill_case(
        64, 2, 2, block_size, chunks, torch.float32
    )
    out = _prefill(q, kc, vc, starts, seq_lens.int(), tables.int(), block_size, 0.125)
    expected = _prefill_reference(q, kc, vc, chunks, rows, block_size, 0.125)
    torch.testing.assert_close(out, expected, **TOL[torch.float32])


def test_prefill_finds_each_of_many_chunks():
    """More chunks than a program scans at once (64), most shorter than a query tile."""
    chunks = [(i % 5, 1 + i % 3) for i in range(70)]
    q, kc, vc, starts, seq_lens, tables, rows = _prefill_case(16, 1, 1, 4, chunks, torch.float32)
    out = _prefill(q, kc, vc, starts, seq_lens, tables, 4, 0.25)
    expected = _prefill_reference(q, kc, vc, chunks, rows, 4, 0.25)
    torch.testing.assert_close(out, expected, **TOL[torch.float32])


@pytest.mark.parametrize("storage", [torch.int8, FP8], ids=["int8", "fp8"])
def test_prefill_over_a_quantized_cache(storage):
    chunks = [(0, 7), (21, 12)]
    q, kc, vc, starts, seq_lens, tables, rows = _prefill_case(
        80, 4, 2, 16, chunks, torch.float32, 5
    )
    kq, ks, k64 = _quantize(kc, storage)
    vq, vs, v64 = _quantize(vc, storage)
    q = q.to(torch.bfloat16)
    out = _prefill(q, kq, vq, starts, seq_lens, tables, 16, 0.1, ks, vs)
    expected = _prefill_reference(q, k64, v64, chunks, rows, 16, 0.1)
    torch.testing.assert_close(out, expected, **TOL[torch.bfloat16])


def test_slots_past_each_length_are_never_read():
    """NaN in every slot no sequence owns (the padding blocks, the tails of last blocks)
    leaves both kernels' outputs finite and as the reference has them."""
    lens = [5, 16, 21]
    q, kc, vc, tables, lens_t, rows = _paged_case(64, 2, 2, 16, lens, torch.float32, seed=6)
    owned = torch.zeros(kc.shape[0], dtype=torch.bool)
    for table, n in zip(rows, lens, strict=True):
        owned[[table[t // 16] * 16 + t % 16 for t in range(n)]] = True
    kc[~owned], vc[~owned] = float("nan"), float("nan")
    expected = _reference(q, kc, vc, rows, lens, 16, 0.125)
    out = _decode(q, kc, vc, tables, lens_t, 16, 0.125, num_splits=2)
    torch.testing.assert_close(out, expected, **TOL[torch.float32])
    packed = triton_kernels.DecodeTiles(8, 4, 2, packed_heads=True)  # whole rows, both heads
    out = _decode(q, kc, vc, tables, lens_t, 16, 0.125, num_splits=2, tiles=packed)
    torch.testing.assert_close(out, expected, **TOL[torch.float32])

    chunks = [(0, 5), (9, 7)]
    q, kc, vc, starts, seq_lens, tables, rows = _prefill_case(64, 2, 2, 16, chunks, torch.float32)
    owned = torch.zeros(kc.shape[0], dtype=torch.bool)
    for table, (prefix, length) in zip(rows, chunks, strict=True):
        owned[[table[t // 16] * 16 + t % 16 for t in range(prefix + length)]] = True
    kc[~owned], vc[~owned] = float("nan"), float("nan")
    out = _prefill(q, kc, vc, starts, seq_lens, tables, 16, 0.125)
    expected = _prefill_reference(q, kc, vc, chunks, rows, 16, 0.125)
    assert bool(expected.isfinite().all())
    torch.testing.assert_close(out, expected, **TOL[torch.float32])


def test_empty_batches_write_nothing():
    q, kc, vc, *_ = _paged_case(64, 2, 2, 16, [5], torch.float32)
    out = torch.empty(0, 4, 64, device=DEVICE)
    kc, vc = kc.to(DEVICE), vc.to(DEVICE)
    none = torch.zeros(0, dtype=torch.long, device=DEVICE)
    tables = torch.zeros(0, 1, dtype=torch.long, device=DEVICE)
    triton_kernels.paged_decode_attention(out, kc, vc, tables, none, 16, 0.1, out)
    starts = torch.zeros(1, dtype=torch.long, device=DEVICE)
    triton_kernels.paged_prefill_attention(out, kc, vc, starts, none, tables, 16, 0.1, out)


def test_bad_inputs_are_refused_with_the_reason():
    q, kc, vc, tables, lens_t, _ = _paged_case(64, 2, 2, 16, [5], torch.float32)
    q, kc, vc, tables, lens_t = (t.to(DEVICE) for t in (q, kc, vc, tables, lens_t))
    decode = triton_kernels.paged_decode_attention
    out = torch.empty_like(q)
    with pytest.raises(TypeError, match="float32, bfloat16 and float16 queries, got torch.float64"):
        decode(q.double(), kc, vc, tables, lens_t, 16, 0.1, out.double())
    with pytest.raises(TypeError, match="must hold q's dtype"):
        decode(q, kc.half(), vc.half(), tables, lens_t, 16, 0.1, out)
    with pytest.raises(ValueError, match=r"block_tables must be an int32 or int64 \[1, \*\]"):
        decode(q, kc, vc, tables.float(), lens_t, 16, 0.1, out)
    with pytest.raises(ValueError, match="multiple of the KV heads"):
        decode(q[:, :3], kc, vc, tables, lens_t, 16, 0.1, out[:, :3])
    with pytest.raises(ValueError, match="block_size=24 must be positive and divide"):
        decode(q, kc, vc, tables, lens_t, 24, 0.1, out)
    with pytest.raises(ValueError, match="needs k_scale and v_scale"):
        decode(q, kc.to(torch.int8), vc.to(torch.int8), tables, lens_t, 16, 0.1, out)
    with pytest.raises(ValueError, match="num_splits=0 must be at least 1"):
        decode(q, kc, vc, tables, lens_t, 16, 0.1, out, num_splits=0)
    starts = torch.tensor([0, 1, 2], device=DEVICE)
    with pytest.raises(ValueError, match=r"query_start_loc must be an int32 or int64 \[2\]"):
        triton_kernels.paged_prefill_attention(q, kc, vc, starts, lens_t, tables, 16, 0.1, out)


def test_the_package_imports_without_triton():
    """Without triton the package imports, says why it is unavailable, and refuses the
    launchers with that reason."""
    script = (
        "import sys; sys.modules['triton'] = None\n"
        "import auto_glm.kernels.triton as t\n"
        "assert not t.available() and 'triton is not importable' in t.unavailable_reason()\n"
        "try:\n"
        "    t.paged_decode_attention\n"
        "except ImportError as e:\n"
        "    assert 'paged_decode_attention needs triton' in str(e), e\n"
        "else:\n"
        "    raise AssertionError('no ImportError')\n"
    )
    subprocess.run([sys.executable, "-c", script], check=True, timeout=120)
    assert triton_kernels.available()


COMPILE_FOR_SM90 = """
import re

import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from auto_glm.kernels.triton import DecodeTiles, decode, prefill
from auto_glm.kernels.triton.paged_attention import _NUM_STAGES as PREFILL_STAGES

target = GPUTarget("cuda", 90, 32)
pointers = dict.fromkeys(("q_ptr", "k_ptr", "v_ptr", "out_ptr"), "*bf16")
pointers |= {"tables_ptr": "*i32", "lens_ptr": "*i32"}
pointers |= dict.fromkeys(("part_max_ptr", "part_sum_ptr", "part_acc_ptr"), "*fp32")
ints = ["block_size", "keys_per_split", "num_heads", "stride_q_seq", "stride_q_head",
        "stride_out_seq", "stride_out_head", "stride_slot", "stride_head", "stride_table"]
dots = {"COMPUTE": tl.bfloat16, "UPCAST": False, "PRECISION": "tf32"}
nano = {"GROUP": 2, "HEAD_DIM": 128, "BLOCK_D": 128}
# the integers that triton, at run time, finds to be multiples of 16 for the nano model
# (16-slot blocks, 16 query heads, 8 KV heads of 128): told here as it tells the compiler
sixteens = {"block_size", "num_heads", "stride_q_seq", "stride_q_head", "stride_out_seq",
            "stride_out_head", "stride_slot", "stride_head", "stride_q_token", "stride_out_token"}


def compile_for_sm90(kernel, signature, constexprs, warps=4, stages=3):
    signature = signature | dict.fromkeys(constexprs, "constexpr")
    hinted = [n for n, kind in signature.items() if kind.startswith("*") or n in sixteens]
    attrs = {(kernel.arg_names.index(n),): [["tt.divisibility", 16]] for n in hinted}
    source = ASTSource(kernel, signature, constexprs, attrs)
    compiled = triton.compile(source, target=target,
                              options={"num_warps": warps, "num_stages": stages})
    return compiled.asm["ptx"]


def build(kernel, scales, constexprs, warps, stages, cache="*bf16"):
    signature = {**pointers, "k_ptr": cache, "v_ptr": cache}
    signature |= dict.fromkeys(scales, "*bf16")
    signature |= {"score_scale": "fp32", **dict.fromkeys(ints, "i32")}
    signature |= dict.fromkeys(("stride_scale_slot",) if scales else (), "i32")
    return compile_for_sm90(kernel, signature, constexprs, warps, stages)


# whether a loop waits for its copies with some still in flight (cp.async.wait_group N,
# N > 0): the next K/V tile loads while this one is computed on
def in_flight(ptx):
    return any(int(n) > 0 for n in re.findall(r"cp[.]async[.]wait_group\\s+(\\d+)", ptx))


# K/V tiles copied ahead asynchronously (cp.async), products on tensor cores; the default
# tiling keeps a tile in flight
default = DecodeTiles()
for split in (False, True):
    constexprs = {**nano, "BLOCK_G": 16, "BLOCK_N": default.block_n, "SPLIT": split,
                  "QUANT": False, "HEADS_FIRST": default.heads_first, **dots}
    ptx = build(decode.decode_kernel, ("k_scale_ptr", "v_scale_ptr"), constexprs,
                default.num_warps, default.num_stages)
    assert "cp.async" in ptx and "mma" in ptx and in_flight(ptx)
    for block_n, warps, stages in ((2, 4, 3), (8, 8, 3), (16, 8, 2)):
        constexprs = {**nano, "KV_HEADS": 8, "BLOCK_H": 16, "BLOCK_N": block_n, "SPLIT": split,
                      **dots}
        ptx = build(decode.decode_packed_kernel, (), constexprs, warps, stages)
        assert "cp.async" in ptx and "mma" in ptx
quantized = {**nano, "BLOCK_G": 16, "BLOCK_N": 32, "SPLIT": True, "QUANT": True,
             "HEADS_FIRST": False, **dots}
build(decode.decode_kernel, ("k_scale_ptr", "v_scale_ptr"), quantized, 8, 3, cache="*i8")
reduce = {"out_ptr": "*bf16", "num_heads": "i32", "num_splits": "i32", "stride_out_seq": "i32",
          "stride_out_head": "i32"}
reduce |= dict.fromkeys(("part_max_ptr", "part_sum_ptr", "part_acc_ptr"), "*fp32")
compile_for_sm90(decode.decode_reduce_kernel, reduce, {"HEAD_DIM": 128, "BLOCK_S": 8,
                                                       "BLOCK_D": 128})
prefill_ints = ["block_size", "num_chunks", "stride_q_token", "stride_q_head", "stride_out_token",
                "stride_out_head", "stride_slot", "stride_head", "stride_scale_slot",
                "stride_table"]
for cache in ("*bf16", "*i8", "*fp8e4nv"):
    signature = {"q_ptr": "*bf16", "k_ptr": cache, "v_ptr": cache, "k_scale_ptr": "*bf16",
                 "v_scale_ptr": "*bf16", "query_start_ptr": "*i32", "seq_lens_ptr": "*i32",
                 "tables_ptr": "*i32", "out_ptr": "*bf16", "score_scale": "fp32"}
    signature |= dict.fromkeys(prefill_ints, "i32")
    constexprs = {**nano, "BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_C": 64,
                  "QUANT": cache != "*bf16", **dots}
    ptx = compile_for_sm90(prefill.prefill_kernel, signature, constexprs, warps=8,
                           stages=PREFILL_STAGES)
    assert "cp.async" in ptx and "mma" in ptx and in_flight(ptx), cache
print("compiled")
"""


def test_the_decode_kernels_compile_for_an_h100_without_one() -> None:
    """The GPU build of the attention kernels for the nano model's shape in bfloat16: decode
    (the default tiling, packed heads, an int8 cache), split-K's reduction, and prefill over
    bfloat16, int8 and fp8 caches. PTX and ptxas for sm_90, in a process without
    TRITON_INTERPRET, so that a kernel the interpreter accepts but the compiler refuses
    fails here rather than on a lent GPU. Given the divisibility triton finds at run time,
    each copies its K/V tiles ahead asynchronously and multiplies on tensor cores, and the
    default decode tiling and prefill keep a K/V tile in flight while one is computed on."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run(
        [sys.executable, "-c", COMPILE_FOR_SM90], capture_output=True, text=True, env=env,
        timeout=300,
    )  # fmt: skip
    if done.returncode and "ptxas" in done.stderr and "not found" in done.stderr.lower():
        pytest.skip("triton's bundled ptxas is missing here")
    assert done.returncode == 0 and "compiled" in done.stdout, done.stderr[-2000:]
