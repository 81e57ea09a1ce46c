"""The benchmark model: a ~120M parameter GLM-4 checkpoint with random weights, built once."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

__all__ = [
    "BENCH_ARCHITECTURE",
    "BENCH_CONFIG",
    "bench_model_path",
    "cached_model_path",
    "checkpoint_architecture",
    "count_parameters",
    "prompt_vocab",
]

BENCH_ARCHITECTURE = "Glm4ForCausalLM"
# GLM-4 shape at ~100M scale: 2 KV groups, 64-dim heads, half-rotary RoPE.
BENCH_CONFIG: dict[str, Any] = {
    "hidden_size": 768,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "num_key_value_heads": 2,
    "head_dim": 64,
    "intermediate_size": 2048,
    "vocab_size": 32000,
    "max_position_embeddings": 2048,
    "partial_rotary_factor": 0.5,
}
# Bump the suffix whenever BENCH_CONFIG changes, so a stale cached model is not reused.
_BENCH_NAME = "bench-glm4-100m-v1"


def cached_model_path(
    directory: str | Path | None, name: str, architecture: str, config: dict, what: str
) -> Path:
    """A random-weight checkpoint in ``directory`` (default ``$AUTOGLM_CACHE/<name>``),
    built once; an existing checkpoint there is used as is (so tests can pass a tiny one)."""
    from auto_glm.checkpoints.cache import cache_root, cached_checkpoint

    final = Path(directory).expanduser() if directory else cache_root() / name
    return cached_checkpoint(final, architecture, config, what)


def bench_model_path(directory: str | Path | None = None) -> Path:
    """The benchmark checkpoint (default ``$AUTOGLM_CACHE/bench-glm4-100m-v1``)."""
    return cached_model_path(
        directory, _BENCH_NAME, BENCH_ARCHITECTURE, BENCH_CONFIG, "benchmark model"
    )


def count_parameters(directory: Path) -> int:
    """Parameters stored in the checkpoint's safetensors files, read from their headers."""
    from safetensors import safe_open

    total = 0
    for file in sorted(directory.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            for name in f.keys():  # noqa: SIM118 (safe_open is no mapping)
                count = 1
                for dim in f.get_slice(name).get_shape():
                    count *= dim
                total += count
    return total


def prompt_vocab(directory: Path) -> list[int]:
    """Token ids a benchmark prompt may use: the tokenizer's ids minus its special ones."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(directory))
    special = set(tokenizer.all_special_ids)
    return [i for i in range(len(tokenizer)) if i not in special]


def checkpoint_architecture(directory: Path) -> str:
    config = json.loads((directory / "config.json").read_text())
    return ",".join(config.get("architectures") or ["?"])
