"""Open-AutoGLM: serve GLM, Llama and Qwen models with our own PyTorch engine."""

from auto_glm.api import AutoGLM, AutoGLMModel, GenerationResult, GLMModel
from auto_glm.sampling_params import SamplingParams

__all__ = ["AutoGLM", "AutoGLMModel", "GLMModel", "GenerationResult", "SamplingParams"]
__version__ = "0.1.0"
