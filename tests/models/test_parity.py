"""Our native models against transformers' on tiny random checkpoints, in float32."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from auto_glm import GLMModel, SamplingParams
from auto_glm.loader import load_model
from tests.reference import hf_greedy, prefill_logits, random_prompts

LLAMA3 = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 64,
    "rope_theta": 10000.0,
}
YARN = {
    "rope_type": "yarn",
    "factor": 4.0,
    "original_max_position_embeddings": 64,
    "rope_theta": 1000000.0,
}

# (architecture, config overrides): partial rotary, GQA ratios, tied/untied, qk-norm,
# attention bias, rope scaling
CASES = [
    ("GlmForCausalLM", {"partial_rotary_factor": 0.5, "head_dim": 32, "num_key_value_heads": 2}),
    ("Glm4ForCausalLM", {"partial_rotary_factor": 0.5, "head_dim": 16, "num_key_value_heads": 1}),
    (
        "Glm4ForCausalLM",
        {
            "partial_rotary_factor": 0.25,
            "num_key_value_heads": 4,
            "tie_word_embeddings": True,
            "attention_bias": False,
        },
    ),
    (
        "LlamaForCausalLM",
        {"num_key_value_heads": 1, "tie_word_embeddings": True, "rope_parameters": LLAMA3},
    ),
    (
        "LlamaForCausalLM",
        {
            "attention_bias": True,
            "mlp_bias": True,
            "rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0},
        },
    ),
    (
        "LlamaForCausalLM",
        {"rope_parameters": {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0}},
    ),
    ("Qwen2ForCausalLM", {"tie_word_embeddings": True, "num_key_value_heads": 2}),
    ("Qwen2ForCausalLM", {"num_key_value_heads": 4, "rope_parameters": YARN}),
    ("Qwen3ForCausalLM", {"head_dim": 32, "num_key_value_heads": 2}),
    (
        "Qwen3ForCausalLM",
        {"attention_bias": True, "num_key_value_heads": 1, "tie_word_embeddings": True},
    ),
]
IDS = [f"{arch}-{i}" for i, (arch, _) in enumerate(CASES)]


@pytest.mark.parametrize(("arch", "overrides"), CASES, ids=IDS)
def test_logits_match_transformers(make_checkpoint, arch, overrides):
    path = make_checkpoint(arch, seed=1, **overrides)
    ours = load_model(str(path), device="cpu", dtype="float32").model
    ref = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ids = torch.randint(0, ours.spec.vocab_size, (97,), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        expected = ref(ids[None]).logits[0]
    torch.testing.assert_close(prefill_logits(ours, ids), expected, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize(("arch", "overrides"), CASES, ids=IDS)
def test_greedy_batch_matches_transformers(make_checkpoint, arch, overrides):
    """Prompts of different lengths run concurrently, long ones in chunks (budget 48)."""
    path = make_checkpoint(arch, seed=1, **overrides)
    new = 10
    with GLMModel(
        str(path), device="cpu", dtype="float32", max_num_batched_tokens=48, max_num_seqs=4
    ) as model:
        prompts = random_prompts(model.engine.loaded.model.spec.vocab_size, [1, 6, 17, 40, 75, 130])
        results = model.generate_batch(
            prompts, SamplingParams(max_tokens=new, temperature=0, ignore_eos=True)
        )
    assert [r.token_ids for r in results] == hf_greedy(path, prompts, new)
    assert {r.finish_reason for r in results} == {"length"}
