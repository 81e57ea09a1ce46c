"""Open-AutoGLM: serve GLM, Llama and Qwen models with our own PyTorch engine."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__all__ = ["AutoGLM", "AutoGLMModel", "GLMModel", "GenerationResult", "SamplingParams"]
__version__ = "0.1.0"

if TYPE_CHECKING:
    from auto_glm.api import AutoGLM, AutoGLMModel, GenerationResult, GLMModel
    from auto_glm.sampling_params import SamplingParams


def __getattr__(name: str) -> Any:
    # imported on first use: torch and transformers take seconds, and `autoglm --help`
    # or `import auto_glm.sampling_params` should not pay for them
    if name == "SamplingParams":
        from auto_glm.sampling_params import SamplingParams

        return SamplingParams
    if name in __all__:
        from auto_glm import api

        return getattr(api, name)
    raise AttributeError(f"module 'auto_glm' has no attribute {name!r}")
