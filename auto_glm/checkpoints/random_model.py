"""Real Hugging Face format checkpoints with random weights, for demos, tests and benchmarks.

The checkpoint is written by transformers itself, so loading it exercises exactly the
file layout, parameter names and config fields a downloaded model has.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import transformers

from auto_glm.checkpoints.tokenizer import EOS_TOKEN, EXTRA_EOS_TOKENS, build_tokenizer

__all__ = ["ARCHITECTURE_CONFIGS", "build_random_checkpoint"]

# Architecture name (config.json "architectures") -> transformers config class name.
ARCHITECTURE_CONFIGS: dict[str, str] = {
    "GlmForCausalLM": "GlmConfig",
    "Glm4ForCausalLM": "Glm4Config",
    "LlamaForCausalLM": "LlamaConfig",
    "Qwen2ForCausalLM": "Qwen2Config",
    "Qwen3ForCausalLM": "Qwen3Config",
}

_TINY: dict[str, Any] = {
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "intermediate_size": 128,
    "max_position_embeddings": 512,
}
_DEFAULT_VOCAB = 1024
# Padded vocabularies (as real checkpoints have) keep the embedding a multiple of this.
_VOCAB_ALIGN = 64


def build_random_checkpoint(
    directory: str | Path,
    architecture: str,
    config_overrides: dict[str, Any] | None = None,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    tokenizer: bool = True,
    max_shard_size: int | str | None = None,
) -> Path:
    """Write a random-weight checkpoint of ``architecture`` into ``directory``.

    ``config_overrides`` replaces the tiny defaults (and any other config field). A
    ``vocab_size`` override is also the tokenizer's target size; otherwise the model's
    vocabulary is the tokenizer's rounded up to a multiple of 64. ``max_shard_size``
    (e.g. ``"100KB"``) writes a sharded checkpoint with an index. Same arguments give
    byte-identical files.
    """
    if architecture not in ARCHITECTURE_CONFIGS:
        raise ValueError(
            f"no random checkpoint builder for {architecture!r}; "
            f"choose one of {', '.join(ARCHITECTURE_CONFIGS)}"
        )
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    overrides = dict(config_overrides or {})
    requested_vocab = overrides.get("vocab_size", _DEFAULT_VOCAB)

    eos_ids = [0]
    vocab = requested_vocab
    if tokenizer:
        tok = build_tokenizer(out, vocab_size=requested_vocab)
        eos_ids = [tok.convert_tokens_to_ids(t) for t in (EOS_TOKEN, *EXTRA_EOS_TOKENS)]
        vocab = max(requested_vocab, -(-len(tok) // _VOCAB_ALIGN) * _VOCAB_ALIGN)

    fields: dict[str, Any] = {
        **_TINY,
        "vocab_size": vocab,
        "bos_token_id": None,
        "eos_token_id": eos_ids[0],
        "pad_token_id": eos_ids[0],
    }
    fields.update(overrides)
    fields.setdefault("head_dim", fields["hidden_size"] // fields["num_attention_heads"])
    config_cls = getattr(transformers, ARCHITECTURE_CONFIGS[architecture])
    config = config_cls(architectures=[architecture], **fields)

    torch.manual_seed(seed)
    model = getattr(transformers, architecture)(config)
    _randomise(model, seed)
    model.to(dtype).save_pretrained(str(out), max_shard_size=max_shard_size or "50GB")
    # GLM-4 style: stop on end-of-text and on the start of a new user or tool turn.
    generation = {"eos_token_id": eos_ids, "pad_token_id": eos_ids[0]}
    (out / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    return out


@torch.no_grad()
def _randomise(model: torch.nn.Module, seed: int) -> None:
    """Re-draw every parameter so the model is not the near-silent default init.

    Matrices (and convolution kernels) get std 1/sqrt(fan_in), which keeps activations
    and logits at unit scale (HF's std 0.02 makes nearly flat logits); norm weights scatter
    around 1 so a model that ignores or misapplies a norm produces visibly different
    outputs in tests.
    """
    generator = torch.Generator().manual_seed(seed)
    for name, param in sorted(model.named_parameters()):
        noise = torch.randn(param.shape, generator=generator, dtype=torch.float32)
        if param.ndim == 1 and "norm" in name:
            param.copy_(1.0 + 0.1 * noise)
        elif param.ndim == 1:
            param.copy_(0.1 * noise)
        else:
            param.copy_(noise / param[0].numel() ** 0.5)  # fan_in: all but dim 0
