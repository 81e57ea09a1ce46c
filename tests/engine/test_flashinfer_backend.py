"""The FlashInfer backend's parts that need neither a GPU nor FlashInfer: the pages it plans
with (compressed sparse rows of the block tables), what the padded decode path hands it
before each step, and which models and devices it refuses, by name and with the fix.

Its kernels run only on a CUDA GPU with the ``gpu`` extra installed:
tests/engine/test_flashinfer_gpu.py checks them there.
"""

from __future__ import annotations

import importlib.util
import typing

import numpy as np
import pytest
import torch

from auto_glm import GLMModel, SamplingParams
from auto_glm.cli import build_parser
from auto_glm.engine.config import EngineConfig
from auto_glm.layers.attention_backends import ATTENTION_BACKENDS, select_attention_backend
from auto_glm.layers.attention_backends.paged_csr import padded_tables, paged_csr, query_starts
from auto_glm.platforms import CudaPlatform, platform_for
from auto_glm.serving.config import ServerConfig
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


def test_flashinfer_is_a_setting_of_the_engine_the_server_and_the_cli(make_checkpoint):
    assert EngineConfig(attention_backend="flashinfer").attention_backend == "flashinfer"
    served = typing.get_args(ServerConfig.model_fields["attention_backend"].annotation)
    assert served == ATTENTION_BACKENDS
    args = build_parser().parse_args(["serve", "--attention-backend", "flashinfer"])
    assert args.attention_backend == "flashinfer"
    path = make_checkpoint("Glm4ForCausalLM", seed=5, partial_rotary_factor=0.5, head_dim=16)
    with pytest.raises(ValueError, match=r"attention_backend='flashinfer' cannot run on cpu"):
        GLMModel(str(path), device="cpu", dtype="float32", attention_backend="flashinfer")
