"""Load Hugging Face format checkpoints (local or from the Hub) into our native models."""

from auto_glm.loader.device import DTYPE_NAMES, resolve_compute_dtype, resolve_device, resolve_dtype
from auto_glm.loader.errors import ModelLoadError
from auto_glm.loader.loader import LoadedModel, load_model
from auto_glm.loader.paths import resolve_model_path

__all__ = [
    "DTYPE_NAMES",
    "LoadedModel",
    "ModelLoadError",
    "load_model",
    "resolve_compute_dtype",
    "resolve_device",
    "resolve_dtype",
    "resolve_model_path",
]
