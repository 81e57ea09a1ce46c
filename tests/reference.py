"""Reference outputs from transformers, for comparing our engine against."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from auto_glm.bench.hf import greedy_continuations
from auto_glm.layers.attention import AttentionMetadata, PrefillChunk, attention_metadata


def hf_greedy(path: Path, prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
    """Greedy continuations of each prompt by transformers, EOS ignored, in float32."""
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return greedy_of(model, prompts, max_new_tokens)


def greedy_of(model, prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
    """Greedy continuations of each prompt by a loaded transformers model, EOS ignored."""
    return greedy_continuations(model, prompts, max_new_tokens)


def random_prompts(vocab_size: int, lengths: list[int], seed: int = 0) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab_size, (n,), generator=gen).tolist() for n in lengths]


def prefix_hit_batches(vocab_size: int) -> tuple[list[list[int]], list[list[int]]]:
    """Two batches of prompts: three of 3-22 tokens, the last behind a 16-token prefix, then
    three behind the same prefix, which hit the prefix cache once the first batch is done."""
    prefix = random_prompts(vocab_size, [16], seed=21)[0]
    first = random_prompts(vocab_size, [3, 11, 6], seed=22)
    first[2] = prefix + first[2]
    later = [prefix + tail for tail in random_prompts(vocab_size, [2, 5, 9], seed=23)]
    return first, later


def prefill_logits(model, ids: torch.Tensor) -> torch.Tensor:
    """One full-prompt prefill through our attention path with a scratch cache."""
    spec = model.spec
    for attn in model.attention_layers():
        attn.k_cache = torch.zeros(len(ids), spec.num_kv_heads, spec.head_dim)
        attn.v_cache = torch.zeros_like(attn.k_cache)
    md = AttentionMetadata(
        slot_mapping=torch.arange(len(ids)), prefills=[PrefillChunk(0, len(ids))]
    )
    with torch.inference_mode(), attention_metadata(md):
        return model.compute_logits(model(ids, torch.arange(len(ids))))
