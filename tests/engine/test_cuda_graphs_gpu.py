"""CUDA graphs of decode steps on a CUDA GPU (skipped without one): in float32 the five
architectures give the same greedy tokens with graphs as without and as transformers, under
continuous batching with padding to a bucket, a prefix-cache hit and a preemption, whether
decode steps are planned ahead of reading back the step before (``overlap_steps``, the
default here) or in turn; so too GLM-4.1V's, with images; and, with two GPUs, an engine on
the second one.
"""

from __future__ import annotations

import json

import pytest
import torch

from auto_glm import GLMModel, SamplingParams
from auto_glm.checkpoints import build_random_vision_checkpoint
from tests.reference import hf_greedy, prefix_hit_batches
from tests.vision_reference import hf_greedy as vision_greedy
from tests.vision_reference import load_reference, mixed_batch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

GREEDY = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
BLOCK = 4
# one tiny checkpoint per architecture (config overrides as in tests/models/test_parity.py),
# with a weight seed whose greedy paths on this workload hold no near-tie that float32
# rounding could flip (checked against transformers on the CPU)
ARCHITECTURES = [
    ("GlmForCausalLM", 1, {"partial_rotary_factor": 0.5, "head_dim": 32, "num_key_value_heads": 2}),
    (
        "Glm4ForCausalLM",
        2,
        {"partial_rotary_factor": 0.5, "head_dim": 16, "num_key_value_heads": 1},
    ),
    ("LlamaForCausalLM", 2, {"num_key_value_heads": 1, "tie_word_embeddings": True}),
    ("Qwen2ForCausalLM", 2, {"tie_word_embeddings": True, "num_key_value_heads": 2}),
    ("Qwen3ForCausalLM", 2, {"head_dim": 32, "num_key_value_heads": 2}),
]


def _block_bytes(path) -> int:
    config = json.loads((path / "config.json").read_text())
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    return 2 * config["num_hidden_layers"] * BLOCK * config["num_key_value_heads"] * head_dim * 4


def _generate(
    path, cuda_graphs: bool, overlap: bool = False
) -> tuple[list[list[int]], list[list[int]], int, int]:
    """Greedy tokens of a workload with three decodes at once (bucket 4), a prefix hit and,
    in 10 usable blocks of 4 slots, a preemption; the prompts; the graph replays, and of
    them the steps planned ahead."""
    options = {
        "max_num_seqs": 4,
        "max_num_batched_tokens": 16,
        "block_size": BLOCK,
        "max_model_len": 64,
        "kv_cache_memory": 11 * _block_bytes(path),
        "attention_backend": "triton",
        "cuda_graphs": cuda_graphs,
    }
    with GLMModel(str(path), device="cuda", dtype="float32", **options) as model:
        graphs = model.engine.core.runner.decode_graphs
        replays = []
        if cuda_graphs:
            assert graphs is not None and graphs.replay == "graph"
            assert sorted(graphs._graphs) == graphs.sizes == [1, 2, 4]
            assert model.engine.core.overlap_steps  # the default with graphs
            model.engine.core.overlap_steps = overlap
            run = graphs.run
            graphs.run = lambda plan, fed=None: replays.append(fed is not None) or run(plan, fed)
        else:
            assert graphs is None
        vocab = model.engine.loaded.model.spec.vocab_size
        prompts, later = prefix_hit_batches(vocab)
        tokens = [r.token_ids for r in model.generate_batch(prompts, GREEDY)]
        tokens += [r.token_ids for r in model.generate_batch(later, GREEDY)]
        stats = model.engine.stats()
    assert stats.prefix_cache_hits >= 2 * 16 and stats.num_preemptions > 0
    return tokens, prompts + later, len(replays), sum(replays)


@pytest.mark.parametrize(
    ("arch", "seed", "overrides"), ARCHITECTURES, ids=[a for a, _, _ in ARCHITECTURES]
)
def test_graphs_give_the_greedy_tokens_of_eager_and_of_transformers(
    make_checkpoint, arch, seed, overrides
):
    path = make_checkpoint(arch, seed=seed, **overrides)
    with_graphs, prompts, replays, ahead = _generate(path, cuda_graphs=True)
    assert replays > 0 and ahead == 0
    overlapped, _, _, ahead = _generate(path, cuda_graphs=True, overlap=True)
    assert ahead > 0
    without, _, _, _ = _generate(path, cuda_graphs=False)
    assert with_graphs == overlapped == without
    assert with_graphs == hf_greedy(path, prompts, GREEDY.max_tokens)


def _generate_with_images(path, cuda_graphs: bool) -> tuple[list[list[int]], list, int]:
    """GLM-4.1V's greedy tokens of three requests at once (bucket 4): one image, two of other
    sizes, none; the prepared inputs; the decode steps planned ahead."""
    options = {"max_num_seqs": 4, "attention_backend": "triton", "cuda_graphs": cuda_graphs}
    with GLMModel(str(path), device="cuda", dtype="float32", **options) as model:
        graphs = model.engine.core.runner.decode_graphs
        ahead = []
        if cuda_graphs:
            assert graphs is not None and graphs.replay == "graph"
            assert model.engine.core.overlap_steps  # the default with graphs
            run = graphs.run
            graphs.run = lambda plan, fed=None: ahead.append(fed is not None) or run(plan, fed)
        else:
            assert graphs is None
        inputs = mixed_batch(model)
        params = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)
        tokens = [r.token_ids for r in model.generate_batch(inputs, params)]
    return tokens, inputs, sum(ahead)


def test_graphs_after_images_give_the_greedy_tokens_of_eager_and_of_transformers(tmp_path):
    """GLM-4.1V's decode steps replay the graphs too, planned ahead, at each request's M-RoPE
    position."""
    path = build_random_vision_checkpoint(tmp_path, seed=2)
    with_graphs, inputs, ahead = _generate_with_images(path, cuda_graphs=True)
    assert ahead > 0
    without, _, _ = _generate_with_images(path, cuda_graphs=False)
    assert with_graphs == without
    assert with_graphs == vision_greedy(load_reference(path), inputs, 10)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")
def test_an_engine_on_the_second_gpu_gives_the_first_ones_tokens(make_checkpoint):
    """The engine builds, captures its graphs and steps in its own device, whichever is the
    calling thread's current one (cuda:0 here): on cuda:1 it gives cuda:0's greedy tokens."""
    path = make_checkpoint("Qwen3ForCausalLM", seed=2, head_dim=32, num_key_value_heads=2)
    options = {"max_num_seqs": 4, "block_size": BLOCK, "max_model_len": 64}
    tokens = {}
    for device in ("cuda:0", "cuda:1"):
        with GLMModel(str(path), device=device, dtype="float32", **options) as model:
            assert model.engine.core.runner.decode_graphs is not None
            prompts, _ = prefix_hit_batches(model.engine.loaded.model.spec.vocab_size)
            tokens[device] = [r.token_ids for r in model.generate_batch(prompts, GREEDY)]
    assert torch.cuda.current_device() == 0
    assert tokens["cuda:1"] == tokens["cuda:0"]
