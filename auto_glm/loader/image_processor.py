"""Load the image processor stored with a multimodal checkpoint (local files only)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from transformers import AutoImageProcessor

from auto_glm.loader.errors import ModelLoadError

__all__ = ["load_image_processor"]


def load_image_processor(path: Path) -> Any:
    """The checkpoint's image processor, PIL backend (no torchvision needed)."""
    if not (path / "preprocessor_config.json").is_file():
        raise ModelLoadError(
            f"model directory {path} takes images but has no preprocessor_config.json; copy "
            "it from the original model repository"
        )
    try:
        return AutoImageProcessor.from_pretrained(
            str(path), local_files_only=True, trust_remote_code=False, backend="pil"
        )
    except (ValueError, OSError, KeyError, TypeError, ImportError) as exc:
        raise ModelLoadError(
            f"could not load the image processor in {path} ({exc}); re-download "
            "preprocessor_config.json"
        ) from exc
