"""Random checkpoints built once into a cache directory, atomically."""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

from auto_glm.checkpoints.random_model import build_random_checkpoint

__all__ = ["cache_root", "cached_checkpoint"]


def cache_root() -> Path:
    """``$AUTOGLM_CACHE``, default ``~/.cache/autoglm``."""
    configured = os.environ.get("AUTOGLM_CACHE")
    return Path(configured).expanduser() if configured else Path.home() / ".cache" / "autoglm"


def cached_checkpoint(final: Path, architecture: str, config: dict[str, Any], what: str) -> Path:
    """``final`` if it holds a checkpoint, else build one there (bf16 random weights).

    The build goes to a temporary sibling renamed into place, so a crash or a concurrent
    builder never leaves a half-written model behind.
    """
    if (final / "config.json").is_file():
        return final
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{final.name}-", dir=final.parent))
    except OSError as exc:
        raise OSError(
            f"cannot create the {what} cache in {final.parent} ({exc}); "
            "set AUTOGLM_CACHE to a writable directory"
        ) from exc
    print(f"autoglm: building the {what} (random weights) in {final} ...", file=sys.stderr)
    try:
        build_random_checkpoint(staging, architecture, config, dtype=torch.bfloat16)
        staging.chmod(0o755)  # mkdtemp makes it private; a shared cache must be readable
        if final.is_dir() and not any(final.iterdir()):
            final.rmdir()  # an empty directory the caller named
        os.rename(staging, final)
    except BaseException as exc:
        shutil.rmtree(staging, ignore_errors=True)
        if (final / "config.json").is_file():  # a concurrent builder won: same bytes
            return final
        if isinstance(exc, OSError):
            raise OSError(
                f"could not build the {what} in {final} ({exc}); if that directory exists, "
                "delete it and retry, or set AUTOGLM_CACHE to another directory"
            ) from exc
        raise
    return final
