"""Native model code for GLM, GLM-4, Llama, Qwen2 and Qwen3 checkpoints."""

from auto_glm.models.decoder import CausalLM, DecoderSpec
from auto_glm.models.registry import MODEL_REGISTRY, SUPPORTED_ARCHITECTURES, resolve_model_class

__all__ = [
    "MODEL_REGISTRY",
    "SUPPORTED_ARCHITECTURES",
    "CausalLM",
    "DecoderSpec",
    "resolve_model_class",
]
