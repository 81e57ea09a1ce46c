"""The padded decode path of CUDA graphs (auto_glm.engine.cuda_graphs), on the CPU: buckets,
the pad block kept out of the block pool and its memory, persistent buffers, and greedy tokens
through the whole engine on the Triton backend (continuous batching, padding to a bucket, a
prefix-cache hit, a preemption) equal to transformers' and to the eager path's.

With ``cuda_graphs=True`` on the CPU the padded path runs eagerly, through the same buffers a
GPU replays its graphs from. The Triton backend runs here in triton's interpreter, which
tests/conftest.py switches on before any test module imports triton.
"""

from __future__ import annotations

import json

import pytest

from auto_glm import GLMModel, SamplingParams
from auto_glm.engine.cuda_graphs import _HostInputs, graph_batch_sizes, pick_batch_size
from auto_glm.engine.request import Request
from tests.reference import hf_greedy, prefix_hit_batches, random_prompts
from tests.triton_env import require_triton_interpreter

GREEDY = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
BLOCK = 4


@pytest.fixture(scope="module")
def path(make_checkpoint):
    return make_checkpoint("Glm4ForCausalLM", seed=5, partial_rotary_factor=0.5, head_dim=16)


def block_bytes(path) -> int:
    """Bytes of one float32 KV block of ``BLOCK`` slots of the checkpoint at ``path``."""
    config = json.loads((path / "config.json").read_text())
    kv_heads, head_dim = config["num_key_value_heads"], config["head_dim"]
    return 2 * config["num_hidden_layers"] * BLOCK * kv_heads * head_dim * 4


def padded_model(path, **options) -> GLMModel:
    """A float32 CPU engine on the Triton backend whose decodes take the padded path."""
    base = {"attention_backend": "triton", "block_size": BLOCK, "max_model_len": 64}
    return GLMModel(str(path), device="cpu", dtype="float32", **(base | options))


def _count_padded_steps(model: GLMModel) -> list[int]:
    """Record the batch size of every step the padded path runs."""
    graphs = model.engine.core.runner.decode_graphs
    batches: list[int] = []
    run = graphs.run

    def counted(plan, fed=None):
        batches.append(len(plan.requests))
        return run(plan, fed)

    graphs.run = counted
    return batches


def test_buckets_are_1_2_4_then_multiples_of_8_up_to_max_num_seqs():
    assert graph_batch_sizes(1) == [1]
    assert graph_batch_sizes(4) == [1, 2, 4]
    assert graph_batch_sizes(20) == [1, 2, 4, 8, 16, 20]
    sizes = graph_batch_sizes(256)
    assert len(sizes) == 35 and sizes[:5] == [1, 2, 4, 8, 16] and sizes[-1] == 256
    assert [pick_batch_size(sizes, n) for n in (1, 3, 5, 9, 17, 250, 256)] == [
        1,
        4,
        8,
        16,
        24,
        256,
        256,
    ]
    assert pick_batch_size(sizes, 257) is None


def test_the_pad_block_is_kept_from_the_pool_and_counted_in_memory(path):
    require_triton_interpreter()
    budget = 9 * block_bytes(path)
    with padded_model(path, kv_cache_memory=budget) as model:
        runner = model.engine.core.runner
        graphs = runner.decode_graphs
        assert graphs is not None and graphs.replay == "eager"  # no CUDA graphs on the CPU
        assert runner.num_blocks == model.engine.core.kv.num_blocks == 8  # 9 less the pad
        assert graphs.pad_block == 8
        attn = model.engine.loaded.model.attention_layers()[0]
        assert attn.k_cache.shape[0] == 9 * BLOCK  # the pool's blocks and the pad block
        pool = model.engine.core.kv.pool
        assert 8 not in pool.allocate(pool.num_free_blocks)
    assert runner.decode_graphs is None  # released as the engine closed, not left to gc
    with padded_model(path, kv_cache_memory=budget, cuda_graphs=False) as model:
        assert model.engine.core.runner.decode_graphs is None
        assert model.engine.num_blocks == 9  # eager decodes need no pad block


def test_persistent_buffers_are_reused_across_steps(path):
    require_triton_interpreter()
    with padded_model(path, max_num_seqs=4) as model:
        graphs = model.engine.core.runner.decode_graphs
        buffers = (graphs.logits, graphs.input_ids, graphs.block_tables, graphs.slot_mapping)
        before = [t.data_ptr() for t in buffers]
        batches = _count_padded_steps(model)
        prompts = random_prompts(model.engine.loaded.model.spec.vocab_size, [3, 7, 5], seed=1)
        model.generate_batch(prompts, GREEDY)
        after = (graphs.logits, graphs.input_ids, graphs.block_tables, graphs.slot_mapping)
        assert [t.data_ptr() for t in after] == before
        assert 3 in batches  # three decodes at once: padded to the bucket of 4


def test_host_block_tables_are_written_once_per_entry_and_always_right():
    rows, width = 3, 5
    host = _HostInputs(5 * rows + rows * width, rows, width, pinned=False)
    a, b = Request("a", [1], GREEDY), Request("b", [1], GREEDY)
    a.block_ids, b.block_ids = [7, 8], [3]

    def fill(*requests: Request) -> None:
        host.fill_tables(list(requests), [list(r.block_ids) for r in requests])
        for row, request in enumerate(requests):
            assert host.tables[row, : len(request.block_ids)].tolist() == request.block_ids

    fill(a, b)
    host.tables[0, 0] = host.tables[1, 0] = -1  # marks: rewritten entries lose them
    a.block_ids.append(9)  # grown in place: only the new entry is written
    host.fill_tables([a, b], [list(a.block_ids), list(b.block_ids)])
    assert host.tables[0, :3].tolist() == [-1, 8, 9] and host.tables[1, 0] == -1
    fill(b, a)  # rows swapped: each is rewritten whole
    a.block_ids = [4, 5]  # freed and readmitted: a new list, rewritten whole
    fill(b, a)
    host.pad(1, 3, pad_block=99, block_size=4)  # a padding row forgets what it held
    fill(b, a)
    assert host.tables[1, :2].tolist() == [4, 5]


def _generate(path, cuda_graphs: bool, **options) -> tuple[list, object, list[int], list]:
    """Greedy tokens of a workload with padding, a prefix hit and (with a small cache) a
    preemption; the engine's stats; the batch sizes the padded path ran; the prompts."""
    with padded_model(
        path, max_num_seqs=4, max_num_batched_tokens=16, cuda_graphs=cuda_graphs, **options
    ) as model:
        batches = _count_padded_steps(model) if cuda_graphs else []
        vocab = model.engine.loaded.model.spec.vocab_size
        prompts, later = prefix_hit_batches(vocab)
        tokens = [r.token_ids for r in model.generate_batch(prompts, GREEDY)]
        tokens += [r.token_ids for r in model.generate_batch(later, GREEDY)]
        return tokens, model.engine.stats(), batches, prompts + later


def test_padded_decodes_give_the_greedy_tokens_of_transformers_and_of_eager(path):
    require_triton_interpreter()
    # 10 blocks of 4 slots cannot hold three requests of 20-33 tokens at once: preemption
    small = {"kv_cache_memory": 11 * block_bytes(path)}
    padded, stats, batches, prompts = _generate(path, True, **small)
    assert stats.prefix_cache_hits >= 2 * 16 and stats.num_preemptions > 0
    assert 3 in batches and max(batches) <= 4
    eager, _, _, _ = _generate(path, False, **small)
    assert padded == eager
    assert padded == hf_greedy(path, prompts, GREEDY.max_tokens)
