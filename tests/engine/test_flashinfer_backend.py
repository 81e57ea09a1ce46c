"""The FlashInfer backend's parts that need neither a GPU nor FlashInfer: the pages it plans
with (compressed sparse rows of the block tables), what the padded decode path hands it
before each step, and which models and devices it refuses, by name and with the fix.

Its kernels run only on a CUDA GPU with the ``gpu`` extra installed:
tests/engine/test_flashinfer_gpu.py checks them there. Where FlashInfer is installed (the
GPU session's tests), whether it can build a model's kernels without nvcc is checked against
its real kernel modules, with a GPU's compute capability the one thing faked.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from auto_glm import SamplingParams
from auto_glm.layers.attention_backends import flashinfer as flashinfer_backend
from auto_glm.layers.attention_backends import select_attention_backend
from auto_glm.layers.attention_backends.paged_csr import padded_tables, paged_csr, query_starts
from auto_glm.platforms import CudaPlatform, platform_for
from tests.engine.test_cuda_graphs import padded_model
from tests.reference import random_prompts
from tests.triton_env import require_triton_interpreter

CPU = platform_for("cpu")
GPU = CudaPlatform(torch.device("cuda", 0))  # built without touching a GPU


def _slots_of(csr, row: int, block_size: int) -> list[int]:
    """The cache slots of keys 0.. of sequence ``row``, read back from its pages."""
    pages = csr.indices[csr.indptr[row] : csr.indptr[row + 1]]
    slots = [int(page) * block_size + offset for page in pages for offset in range(block_size)]
    full = (len(pages) - 1) * block_size
    return slots[: full + int(csr.last_page_len[row])]


def test_the_pages_of_each_sequence_hold_exactly_its_keys():
    bs = 4
    tables = [[7], [2, 5, 9], [3, 8], [6, 1, 4, 0]]
    lens = [1, 9, 8, 13]  # one key; a last page of 1; full pages; a last page of 1 again
    csr = paged_csr(np.asarray(padded_tables(tables)), np.asarray(lens), bs)
    assert csr.indptr.tolist() == [0, 1, 4, 6, 10]
    assert csr.indices.tolist() == [7, 2, 5, 9, 3, 8, 6, 1, 4, 0]
    assert csr.last_page_len.tolist() == [1, 1, 4, 1]
    assert all(a.dtype == np.int32 for a in (csr.indptr, csr.indices, csr.last_page_len))
    for row, (table, length) in enumerate(zip(tables, lens, strict=True)):
        expected = [table[p // bs] * bs + p % bs for p in range(length)]
        assert _slots_of(csr, row, bs) == expected
    indptr, indices, last = csr.tensors()
    assert indptr.dtype == indices.dtype == last.dtype == torch.int32
    assert indices.tolist() == csr.indices.tolist() and indptr.device.type == "cpu"
    assert query_starts([1, 6, 3, 2]).tolist() == [0, 1, 7, 10, 12]
    assert query_starts([1, 6, 3, 2]).dtype == torch.int32


def test_pages_past_a_short_table_or_an_empty_sequence_are_refused():
    with pytest.raises(ValueError, match=r"a sequence of 9 keys needs more than 2 blocks"):
        paged_csr(np.asarray([[1, 2]]), np.asarray([9]), 4)
    with pytest.raises(
        ValueError, match=r"every sequence needs at least one key; got lens \[3, 0\]"
    ):
        paged_csr(np.asarray([[1], [2]]), np.asarray([3, 0]), 4)
    empty = paged_csr(np.zeros((0, 0), np.int32), np.zeros(0, np.int32), 4)
    assert empty.indptr.tolist() == [0] and empty.indices.size == 0


def test_the_padded_decode_path_hands_the_backend_each_steps_pages(make_checkpoint):
    """What FlashInfer's decode graphs plan from before every step: on the CPU the Triton
    backend takes the same call (and ignores it), so the values are checked here."""
    require_triton_interpreter()
    path = make_checkpoint("Glm4ForCausalLM", seed=5, partial_rotary_factor=0.5, head_dim=16)
    with padded_model(path, max_num_seqs=4) as model:
        graphs = model.engine.core.runner.decode_graphs
        bs, pad = graphs.block_size, graphs.pad_block
        checked: list[int] = []
        handed: list[tuple[np.ndarray, np.ndarray]] = []
        graphs._backend.prepare_decode = lambda md, tables, lens: handed.append(
            (tables.copy(), lens.copy())
        )
        run = graphs.run

        def checked_run(plan, fed=None):
            logits = run(plan, fed)
            tables, lens = handed.pop()
            assert lens.shape[0] == tables.shape[0] >= len(plan.requests)  # the bucket
            csr = paged_csr(tables, lens, bs)
            rows = zip(plan.start_positions, plan.block_tables, strict=True)
            for row, (pos, table) in enumerate(rows):
                expected = [table[p // bs] * bs + p % bs for p in range(pos + 1)]
                assert _slots_of(csr, row, bs) == expected
                assert expected[-1] == plan.slot_mapping[row]  # the slot this step writes
            for row in range(len(plan.requests), lens.shape[0]):  # padding rows
                assert _slots_of(csr, row, bs) == [pad * bs]
            checked.append(len(plan.requests))
            return logits

        graphs.run = checked_run
        vocab = model.engine.loaded.model.spec.vocab_size
        greedy = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
        model.generate_batch(random_prompts(vocab, [3, 9, 5], seed=2), greedy)
    assert 3 in checked and not handed  # three decodes padded to the bucket of 4


@pytest.mark.parametrize(
    ("platform", "installed", "dtype", "kv_cache_dtype", "head_dim", "reason"),
    [
        (CPU, True, torch.bfloat16, "auto", 128, "run on CUDA GPUs only, not on cpu"),
        (GPU, False, torch.bfloat16, "auto", 128, r"pip install 'open-autoglm\[gpu\]'"),
        (GPU, True, torch.float32, "auto", 128, "float16 and bfloat16 models, not float32"),
        (GPU, True, torch.float16, "int8", 128, "not a kv_cache_dtype='int8' one"),
        (GPU, True, torch.bfloat16, "auto", 80, "head_dim 64, 128, 256, not this model's 80"),
    ],
)
def test_flashinfer_where_it_cannot_run_is_refused_and_auto_passes_it_by(
    monkeypatch, platform, installed, dtype, kv_cache_dtype, head_dim, reason
):
    require_triton_interpreter()
    found = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: (
            (found("torch") if installed else None) if name == "flashinfer" else found(name, *a)
        ),
    )
    options = {"head_dim": head_dim, "dtype": dtype, "kv_cache_dtype": kv_cache_dtype}
    with pytest.raises(
        ValueError,
        match=rf"attention_backend='flashinfer' cannot run on {platform.device}: .*{reason}.*; "
        r"use attention_backend='auto' or 'torch'",
    ):
        select_attention_backend("flashinfer", platform, kernels=None, **options)
    auto = select_attention_backend("auto", platform, kernels=None, **options)
    assert auto.name == ("triton" if platform is GPU else "torch")


def test_nvcc_is_looked_for_where_flashinfer_looks(monkeypatch, tmp_path):
    """$CUDA_HOME (or $CUDA_PATH) when set, even with another nvcc on PATH; else PATH; else
    /usr/local/cuda."""
    toolkit, empty = tmp_path / "cuda", tmp_path / "empty"
    (toolkit / "bin").mkdir(parents=True)
    empty.mkdir()
    nvcc = toolkit / "bin" / "nvcc"
    nvcc.write_text("#!/bin/sh\n")
    nvcc.chmod(0o755)
    for name in ("CUDA_HOME", "CUDA_PATH"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("PATH", str(empty))
    monkeypatch.setattr(flashinfer_backend, "DEFAULT_CUDA_HOME", tmp_path / "absent")
    assert flashinfer_backend.find_nvcc() is None
    monkeypatch.setattr(flashinfer_backend, "DEFAULT_CUDA_HOME", toolkit)
    assert flashinfer_backend.find_nvcc() == nvcc
    monkeypatch.setattr(flashinfer_backend, "DEFAULT_CUDA_HOME", tmp_path / "absent")
    monkeypatch.setenv("PATH", str(toolkit / "bin"))
    assert flashinfer_backend.find_nvcc() == nvcc
    monkeypatch.setenv("CUDA_PATH", str(empty))
    assert flashinfer_backend.find_nvcc() is None
    monkeypatch.setenv("CUDA_HOME", str(toolkit))
    assert flashinfer_backend.find_nvcc() == nvcc


def _without_nvcc(monkeypatch, tmp_path) -> None:
    for name in ("CUDA_HOME", "CUDA_PATH"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setattr(flashinfer_backend, "DEFAULT_CUDA_HOME", tmp_path / "absent")


@pytest.mark.skipif(
    importlib.util.find_spec("flashinfer") is not None, reason="FlashInfer imports here"
)
def test_flashinfer_that_does_not_load_or_an_old_gpu_is_refused(monkeypatch, tmp_path):
    """Without nvcc, FlashInfer is asked which kernels it has built; a package that is found
    but does not import is refused by name, and auto takes Triton. So is a GPU older than
    FlashInfer's kernels (its compute capability is the one thing faked here)."""
    require_triton_interpreter()
    _without_nvcc(monkeypatch, tmp_path)
    capability = [(9, 0)]
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability[0])
    found = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: found("torch") if name == "flashinfer" else found(name, *a),
    )
    options = {"head_dim": 128, "dtype": torch.bfloat16, "kv_cache_dtype": "auto"}
    with pytest.raises(
        ValueError,
        match=r"attention_backend='flashinfer' cannot run on cuda:0: the flashinfer package "
        r"does not load \(No module named 'flashinfer'\); reinstall 'open-autoglm\[gpu\]'",
    ):
        select_attention_backend("flashinfer", GPU, kernels=None, **options)
    assert select_attention_backend("auto", GPU, kernels=None, **options).name == "triton"
    capability[0] = (7, 0)
    with pytest.raises(
        ValueError, match=r"need compute capability 7\.5 or newer, not cuda:0's 7\.0; use"
    ):
        select_attention_backend("flashinfer", GPU, kernels=None, **options)


NO_NVCC = """
import torch

if not torch.cuda.is_available():  # the one thing faked here: a Hopper GPU's capability
    torch.cuda.get_device_capability = lambda device=None: (9, 0)
from auto_glm.layers.attention_backends import flashinfer as backend

cuda = torch.device("cuda", 0)
print("before:", backend.problem(cuda, 64, torch.float16, "auto"))
for spec in backend.kernel_specs(torch.float16, 64, hopper=True):
    spec.jit_library_path.parent.mkdir(parents=True, exist_ok=True)
    spec.jit_library_path.write_bytes(b"")  # where an earlier run's compile leaves it
print("after:", backend.problem(cuda, 64, torch.float16, "auto"))
"""


@pytest.mark.skipif(
    importlib.util.find_spec("flashinfer") is None,
    reason="needs FlashInfer: pip install 'open-autoglm[gpu]'",
)
def test_without_nvcc_flashinfer_runs_only_where_its_kernels_are_built(tmp_path):
    """FlashInfer compiles a kernel the first time a plan needs it: without nvcc (most
    installs of torch's CUDA wheels), a model whose kernels are neither prebuilt nor
    compiled by an earlier run is refused, with the fix, instead of failing at start. A
    float16, head_dim 64 model, whose kernels nothing prebuilds, in a fresh JIT cache."""
    empty = tmp_path / "no-cuda"
    empty.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "CUDA_PATH"}
    env |= {
        "CUDA_HOME": str(empty),  # FlashInfer's toolkit, without nvcc
        "FLASHINFER_WORKSPACE_BASE": str(tmp_path / "workspace"),  # its JIT cache
        "FLASHINFER_CUDA_ARCH_LIST": "9.0a",
    }
    done = subprocess.run(
        [sys.executable, "-c", NO_NVCC], capture_output=True, text=True, env=env, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    before, after = done.stdout.strip().splitlines()[-2:]
    assert before.startswith(
        "before: FlashInfer compiles its kernels with nvcc on first use, and there is no nvcc here"
    )
    assert "nor are 3 of this model's kernels built yet; install the CUDA toolkit's nvcc" in before
    assert after == "after: None"
