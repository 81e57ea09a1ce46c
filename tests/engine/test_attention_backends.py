"""Attention backends and the platform object: every backend gives transformers' greedy
tokens through the whole engine (continuous batching, chunked prefill, a prefix-cache hit),
``auto`` picks what the platform prefers, and a backend that cannot run is refused by name.

The Triton backend runs here on CPU tensors in triton's interpreter, which tests/conftest.py
switches on before any test module imports triton.
"""

from __future__ import annotations

import importlib.machinery
import logging
import shutil
import sys
import types

import psutil
import pytest
import torch

from auto_glm import GLMModel, SamplingParams
from auto_glm.engine.config import EngineConfig
from auto_glm.kernels import cpu_kernels
from auto_glm.kernels import triton as triton_kernels
from auto_glm.layers.attention_backends import (
    CpuBackend,
    ScheduledSequence,
    StepLayout,
    TorchBackend,
    load_cpu_kernels,
    select_attention_backend,
)
from auto_glm.platforms import CpuPlatform, CudaPlatform, platform_for
from tests.reference import hf_greedy, random_prompts
from tests.triton_env import require_triton_interpreter

CPU = platform_for("cpu")
BACKENDS = ["torch", "cpu", "triton"]


def _require(backend: str) -> None:
    """Skip, saying why, where a backend's kernels cannot exist on this machine."""
    if backend == "cpu" and shutil.which("c++") is None:
        pytest.skip("no C++ compiler (c++): the native CPU kernels cannot be built here")
    if backend == "cpu":
        assert cpu_kernels() is not None, "a C++ compiler is present but the kernels did not build"
    if backend == "triton":
        require_triton_interpreter()


@pytest.fixture(scope="module")
def path(make_checkpoint):
    return make_checkpoint("Glm4ForCausalLM", seed=3, partial_rotary_factor=0.5, head_dim=16)


@pytest.mark.parametrize("kv_cache_dtype", ["auto", "int8"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_every_backend_gives_the_greedy_tokens_of_transformers(path, backend, kv_cache_dtype):
    _require(backend)
    greedy = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)
    # 8-token steps split every prompt into prefill chunks that run beside other requests'
    # decodes; the last two prompts reuse the first one's 32-token prefix from the cache
    # (an int8 cache changes no token of this model and workload)
    options = {
        "max_num_seqs": 4,
        "max_num_batched_tokens": 8,
        "attention_backend": backend,
        "kv_cache_dtype": kv_cache_dtype,
    }
    with GLMModel(str(path), device="cpu", dtype="float32", **options) as model:
        assert model.engine.loaded.model.attention_layers()[0].backend.name == backend
        vocab = model.engine.loaded.model.spec.vocab_size
        prefix = random_prompts(vocab, [32], seed=11)[0]
        prompts = random_prompts(vocab, [1, 13, 6], seed=12)
        prompts[2] = prefix + prompts[2]
        first = model.generate_batch(prompts, greedy)
        later = [prefix + tail for tail in random_prompts(vocab, [3, 9], seed=14)]
        second = model.generate_batch(later, greedy)
        assert model.engine.stats().prefix_cache_hits >= 2 * 32
    expected = hf_greedy(path, prompts + later, greedy.max_tokens)
    assert [r.token_ids for r in first + second] == expected


def test_auto_picks_the_cpu_kernels_on_the_cpu_and_torch_without_them(path):
    _require("cpu")
    with GLMModel(str(path), device="cpu", dtype="float32") as model:
        assert isinstance(model.engine.loaded.model.attention_layers()[0].backend, CpuBackend)
    with GLMModel(str(path), device="cpu", dtype="float32", cpu_kernels=False) as model:
        assert type(model.engine.loaded.model.attention_layers()[0].backend) is TorchBackend


def test_the_triton_metadata_carries_what_its_launchers_take():
    _require("triton")
    from auto_glm.layers.attention_backends.triton import TritonBackend

    # two decodes, then a chunk after 20 cached tokens and a fresh 3-token prompt
    sequences = [
        ScheduledSequence(0, 1, 4, [7]),
        ScheduledSequence(1, 1, 17, [2, 5]),
        ScheduledSequence(2, 6, 20, [1, 3]),
        ScheduledSequence(8, 3, 0, [9]),
    ]
    layout = StepLayout(list(range(100, 111)), sequences, num_decodes=2, block_size=16)
    md = TritonBackend().build_metadata(layout, torch.device("cpu"))
    assert md.num_decodes == 2 and md.block_size == 16
    assert md.slot_mapping.dtype == torch.long and md.slot_mapping.tolist() == layout.slot_mapping
    assert md.decode_block_tables.dtype == torch.int32
    assert md.decode_block_tables.tolist() == [[7, 0], [2, 5]]
    assert md.decode_context_lens.tolist() == [5, 18]
    assert md.prefill_query_start_loc.tolist() == [0, 6, 9]
    assert md.prefill_seq_lens.tolist() == [26, 3]
    assert md.prefill_block_tables.tolist() == [[1, 3], [9, 0]]


def test_triton_outside_its_interpreter_on_the_cpu_is_refused(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET")
    with pytest.raises(
        ValueError,
        match=r"attention_backend='triton' cannot run on cpu: .*"
        r"TRITON_INTERPRET=1.*use attention_backend='auto' or 'torch'",
    ):
        select_attention_backend("triton", CPU, head_dim=64, dtype=torch.float32, kernels=None)


@pytest.fixture
def no_flashinfer(monkeypatch):
    """FlashInfer absent (auto's first choice on a GPU), wherever it is installed."""
    monkeypatch.setitem(sys.modules, "flashinfer", None)  # what importing it finds when absent


def test_triton_without_the_package_is_refused(monkeypatch, no_flashinfer):
    monkeypatch.setitem(sys.modules, "triton", None)
    with pytest.raises(ValueError, match=r"attention_backend='triton'.*pip install triton"):
        select_attention_backend("triton", CPU, head_dim=64, dtype=torch.float32, kernels=None)
    # where Triton is the default, auto falls back to torch
    gpu = CudaPlatform(torch.device("cuda", 0))
    backend = select_attention_backend("auto", gpu, head_dim=64, dtype=torch.bfloat16, kernels=None)
    assert type(backend) is TorchBackend


@pytest.mark.parametrize(
    ("version", "problem"),
    [
        ("3.3.1", "triton 3.3.1 is older than 3.4, the oldest that builds these kernels"),
        ("2.3.0", "triton 2.3.0 is older than 3.4"),
        ("3.4.0", None),
        ("3.6.0", None),
        ("3.10.0", None),  # minor 10 is newer than 4
        ("4.0.0+git1234abcd", None),
        ("nightly", "triton's version 'nightly' cannot be read; these kernels need 3.4+"),
    ],
)
def test_the_triton_versions_that_build_the_kernels(version, problem):
    found = triton_kernels.triton_version_problem(version)
    if problem is None:
        assert found is None
    else:
        assert problem in found and "upgrade torch to 2.8 or newer" in found


@pytest.fixture
def old_triton(monkeypatch):
    """triton 3.3.1 (torch 2.7's) in place of the installed one, for this test only."""
    old = types.ModuleType("triton")
    old.__version__ = "3.3.1"
    old.__spec__ = importlib.machinery.ModuleSpec("triton", None)
    monkeypatch.setitem(sys.modules, "triton", old)
    triton_kernels.unavailable_reason.cache_clear()
    yield
    triton_kernels.unavailable_reason.cache_clear()


def test_a_triton_too_old_for_the_kernels_is_refused_and_auto_says_so(
    old_triton, no_flashinfer, caplog
):
    """The kernels need triton 3.4+: an older one is refused by name, with the fix, and
    ``auto`` on a GPU logs why it passes over Triton for torch."""
    gpu = CudaPlatform(torch.device("cuda", 0))
    assert not triton_kernels.available() and gpu.fused_kernels(torch.bfloat16) is None
    with pytest.raises(
        ValueError,
        match=r"attention_backend='triton' cannot run on cuda:0: triton 3\.3\.1 is older than "
        r"3\.4.*upgrade torch to 2\.8 or newer.*use attention_backend='auto' or 'torch'",
    ):
        select_attention_backend("triton", gpu, head_dim=64, dtype=torch.bfloat16, kernels=None)
    with pytest.raises(ImportError, match=r"paged_decode_attention needs triton: triton 3\.3\.1"):
        triton_kernels.paged_decode_attention  # noqa: B018 - the attribute loads the launcher
    selector = "auto_glm.layers.attention_backends.selector"
    with caplog.at_level(logging.INFO, logger=selector):
        backend = select_attention_backend(
            "auto", gpu, head_dim=64, dtype=torch.bfloat16, kernels=None
        )
    assert type(backend) is TorchBackend
    passed_over = [r.getMessage() for r in caplog.records if r.name == selector]
    reason = triton_kernels.triton_version_problem("3.3.1")
    assert f"attention_backend=auto: not 'triton' on cuda:0: {reason}" in passed_over
    assert not any("'torch'" in m for m in passed_over)  # the one it took


@pytest.mark.parametrize(
    ("platform", "enabled", "dtype", "head_dim", "reason"),
    [
        (CudaPlatform(torch.device("cuda", 0)), True, torch.float32, 64, "CPU only, not on cuda:0"),
        (CPU, False, torch.float32, 64, "cpu_kernels=False turns them off"),
        (CPU, True, torch.float16, 64, "built for float32 and bfloat16, not float16"),
        (CPU, True, torch.float32, 48, "head_dim 16, 32, .* not this model's 48"),
    ],
)
def test_the_cpu_backend_where_its_kernels_cannot_run_is_refused(
    platform, enabled, dtype, head_dim, reason
):
    if platform.has_native_cpu_kernels and enabled and dtype == torch.float32:
        _require("cpu")
    kernels, off = load_cpu_kernels(platform, enabled, dtype)
    with pytest.raises(
        ValueError,
        match=rf"attention_backend='cpu' needs the native CPU "
        rf"kernels, but .*{reason}.*; use attention_backend='torch'",
    ):
        select_attention_backend(
            "cpu", platform, head_dim=head_dim, dtype=dtype, kernels=kernels, kernels_off=off
        )
    if platform is CPU:  # where the CPU kernels are the default, auto falls back to torch
        auto = select_attention_backend(
            "auto", platform, head_dim=head_dim, dtype=dtype, kernels=kernels, kernels_off=off
        )
        assert type(auto) is TorchBackend


def test_an_unknown_backend_is_refused_by_the_engine_config():
    with pytest.raises(
        ValueError,
        match=r"attention_backend='flash' is invalid: it must be "
        r"one of auto, torch, cpu, triton, flashinfer",
    ):
        EngineConfig(attention_backend="flash")


def test_the_cpu_platform_reports_the_cpu():
    assert isinstance(CPU, CpuPlatform) and CPU.name == "cpu"
    assert CPU.attention_backends == ("cpu", "torch")
    assert CPU.has_native_cpu_kernels and CPU.prepacks_linear_weights
    assert not CPU.supports_cuda_graphs
    native_bf16 = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    assert CPU.fast_dtypes() == (
        (torch.float32, torch.bfloat16) if native_bf16 else (torch.float32,)
    )
    assert set(CPU.supported_dtypes()) == {torch.float32, torch.bfloat16, torch.float16}
    assert CPU.default_dtype() == torch.bfloat16
    assert "very slow" in CPU.dtype_warning(torch.float16)
    assert CPU.dtype_warning(torch.float32) is None
    assert 0 < CPU.free_memory() <= psutil.virtual_memory().total
    CPU.synchronize()  # nothing is queued on a CPU: returns at once


def test_a_device_without_a_platform_is_refused():
    with pytest.raises(ValueError, match="device 'meta' has no platform; use cpu or cuda:N"):
        platform_for("meta")
