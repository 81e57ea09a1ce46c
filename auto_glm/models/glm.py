"""GLM-4-9B (``GlmForCausalLM``) and GLM-4-0414 (``Glm4ForCausalLM``)."""

from __future__ import annotations

from auto_glm.models.config_reader import read_spec
from auto_glm.models.decoder import CausalLM, DecoderSpec

__all__ = ["Glm4ForCausalLM", "GlmForCausalLM"]


class GlmForCausalLM(CausalLM):
    """Partial, interleaved rotary; q/k/v bias; gate/up already fused in the checkpoint."""

    @classmethod
    def spec_from_config(cls, hf_config) -> DecoderSpec:
        return read_spec(hf_config, interleaved_rope=True, o_bias=False)


class Glm4ForCausalLM(CausalLM):
    """GLM with extra norms after attention and after the MLP, before each residual add."""

    @classmethod
    def spec_from_config(cls, hf_config) -> DecoderSpec:
        return read_spec(hf_config, interleaved_rope=True, o_bias=False, sandwich_norm=True)
