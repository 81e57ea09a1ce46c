"""Architecture name (``config.architectures[0]``) -> our model class."""

from __future__ import annotations

from typing import Any

from auto_glm.models.decoder import CausalLM
from auto_glm.models.glm import Glm4ForCausalLM, GlmForCausalLM
from auto_glm.models.glm4v import Glm4vForConditionalGeneration
from auto_glm.models.llama import LlamaForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM

__all__ = ["ARCHITECTURES", "SUPPORTED_ARCHITECTURES", "resolve_model_class"]

ARCHITECTURES: dict[str, type[CausalLM]] = {
    cls.__name__: cls
    for cls in (
        GlmForCausalLM,
        Glm4ForCausalLM,
        Glm4vForConditionalGeneration,
        LlamaForCausalLM,
        Qwen2ForCausalLM,
        Qwen3ForCausalLM,
    )
}
SUPPORTED_ARCHITECTURES = tuple(ARCHITECTURES)


def resolve_model_class(hf_config: Any) -> type[CausalLM]:
    """The class for this config; validates the config so unsupported math fails here."""
    archs = getattr(hf_config, "architectures", None) or []
    for arch in archs:
        if arch in ARCHITECTURES:
            cls = ARCHITECTURES[arch]
            cls.spec_from_config(hf_config)
            return cls
    raise ValueError(
        f"unsupported architecture {archs or '(none in config.json)'}; "
        f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
    )
