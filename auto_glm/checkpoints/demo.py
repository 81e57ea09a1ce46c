"""The built-in demo model: a small random-weight GLM-4-0414 checkpoint, built once and cached."""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

from auto_glm.checkpoints.random_model import build_random_checkpoint

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


def _cache_root() -> Path:
    configured = os.environ.get("AUTOGLM_CACHE")
    return Path(configured).expanduser() if configured else Path.home() / ".cache" / "autoglm"


def demo_model_path() -> Path:
    """Directory of the demo checkpoint, building it on first use.

    It lives in ``$AUTOGLM_CACHE/demo-glm4-v1`` (default ``~/.cache/autoglm/demo-glm4-v1``).
    The build goes to a temporary sibling that is renamed into place, so a crash or a
    concurrent builder never leaves a half-written model behind.
    """
    root = _cache_root()
    final = root / _DEMO_NAME
    if (final / "config.json").is_file():
        return final
    try:
        root.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{_DEMO_NAME}-", dir=root))
    except OSError as exc:
        raise OSError(
            f"cannot create the demo model cache in {root} ({exc}); "
            "set AUTOGLM_CACHE to a writable directory"
        ) from exc
    print(f"autoglm: building the demo model (random weights) in {final} ...", file=sys.stderr)
    try:
        build_random_checkpoint(staging, DEMO_ARCHITECTURE, DEMO_CONFIG, dtype=torch.bfloat16)
        staging.chmod(0o755)  # mkdtemp makes it private; a shared cache must be readable
        os.rename(staging, final)
    except OSError as exc:
        shutil.rmtree(staging, ignore_errors=True)
        # Another process finished first: its copy is identical, so use it.
        if not (final / "config.json").is_file():
            raise OSError(
                f"could not build the demo model in {final} ({exc}); if that directory "
                "exists, delete it and retry, or set AUTOGLM_CACHE to another directory"
            ) from exc
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return final
