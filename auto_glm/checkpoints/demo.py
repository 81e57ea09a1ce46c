"""The built-in demo model: a small random-weight GLM-4-0414 checkpoint, built once and cached."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from auto_glm.checkpoints.cache import cache_root, cached_checkpoint

__all__ = ["DEMO_ARCHITECTURE", "DEMO_CONFIG", "demo_model_path"]

DEMO_ARCHITECTURE = "Glm4ForCausalLM"
# Sized to decode at interactive speed on two CPU cores while keeping GLM-4-0414's shape:
# grouped-query attention, 64-dim heads with half-rotary RoPE, fused gate/up MLP.
DEMO_CONFIG: dict[str, Any] = {
    "hidden_size": 256,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 64,
    "partial_rotary_factor": 0.5,
    "intermediate_size": 688,
    "vocab_size": 8192,
    "max_position_embeddings": 4096,
    "rms_norm_eps": 1e-5,
}
# Bump the suffix whenever DEMO_CONFIG or the builders change, so stale caches are not reused.
_DEMO_NAME = "demo-glm4-v1"


def demo_model_path() -> Path:
    """Directory of the demo checkpoint, built on first use into
    ``$AUTOGLM_CACHE/demo-glm4-v1`` (default ``~/.cache/autoglm/demo-glm4-v1``)."""
    return cached_checkpoint(
        cache_root() / _DEMO_NAME, DEMO_ARCHITECTURE, DEMO_CONFIG, "demo model"
    )
