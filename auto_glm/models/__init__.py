"""Native model code for GLM, GLM-4, GLM-4.1V (images in), Llama, Qwen2 and Qwen3 checkpoints."""

from auto_glm.models.architectures import (
    ARCHITECTURES,
    SUPPORTED_ARCHITECTURES,
    resolve_model_class,
)
from auto_glm.models.decoder import CausalLM, DecoderSpec

__all__ = [
    "ARCHITECTURES",
    "SUPPORTED_ARCHITECTURES",
    "CausalLM",
    "DecoderSpec",
    "resolve_model_class",
]
