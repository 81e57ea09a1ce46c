"""Llama (``LlamaForCausalLM``) and the Qwen2/Qwen3 variants of it."""

from __future__ import annotations

from auto_glm.models.config_reader import read_spec
from auto_glm.models.decoder import CausalLM, DecoderSpec

__all__ = ["LlamaForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM"]


class LlamaForCausalLM(CausalLM):
    @classmethod
    def spec_from_config(cls, hf_config) -> DecoderSpec:
        return read_spec(hf_config, interleaved_rope=False)


class Qwen2ForCausalLM(CausalLM):
    """Llama with a bias on q/k/v (always on in Qwen2)."""

    @classmethod
    def spec_from_config(cls, hf_config) -> DecoderSpec:
        return read_spec(hf_config, interleaved_rope=False, qkv_bias=True, o_bias=False)


class Qwen3ForCausalLM(CausalLM):
    """Llama with RMSNorm on each head of q and k, and an optional q/k/v bias."""

    @classmethod
    def spec_from_config(cls, hf_config) -> DecoderSpec:
        return read_spec(hf_config, interleaved_rope=False, qk_norm=True)
