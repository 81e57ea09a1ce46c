"""Config features we do not implement are refused by name, never computed wrongly."""

from __future__ import annotations

import pytest
import transformers

from auto_glm.models import SUPPORTED_ARCHITECTURES, resolve_model_class
from auto_glm.models.config_reader import UnsupportedConfigError

TINY = {
    "vocab_size": 64,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 1,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
}


def _config(cls, arch: str, **fields):
    return getattr(transformers, cls)(architectures=[arch], **{**TINY, **fields})


@pytest.mark.parametrize(
    ("config", "message"),
    [
        (_config("LlamaConfig", "LlamaForCausalLM", hidden_act="gelu"), "hidden_act='gelu'"),
        (
            _config(
                "Qwen2Config",
                "Qwen2ForCausalLM",
                use_sliding_window=True,
                sliding_window=16,
                max_window_layers=0,
            ),
            "sliding-window",
        ),
        (
            _config(
                "LlamaConfig",
                "LlamaForCausalLM",
                rope_parameters={
                    "rope_type": "longrope",
                    "rope_theta": 10000.0,
                    "short_factor": [1.0] * 4,
                    "long_factor": [1.0] * 4,
                    "original_max_position_embeddings": 16,
                },
            ),
            "rope type 'longrope'",
        ),
    ],
)
def test_unsupported_features_are_refused(config, message):
    with pytest.raises(UnsupportedConfigError, match=message):
        resolve_model_class(config)


def test_pre_quantized_checkpoint_is_refused():
    config = _config("LlamaConfig", "LlamaForCausalLM")
    config.quantization_config = {"quant_method": "gptq", "bits": 4}
    with pytest.raises(UnsupportedConfigError, match="pre-quantized"):
        resolve_model_class(config)


def test_unknown_architecture_lists_the_supported_ones():
    config = _config("LlamaConfig", "MistralForCausalLM")
    with pytest.raises(ValueError) as info:
        resolve_model_class(config)
    assert all(name in str(info.value) for name in SUPPORTED_ARCHITECTURES)


def test_gqa_ratio_must_divide():
    config = _config(
        "LlamaConfig", "LlamaForCausalLM", num_attention_heads=4, num_key_value_heads=3
    )
    with pytest.raises(ValueError, match="not a multiple"):
        resolve_model_class(config)(config)
