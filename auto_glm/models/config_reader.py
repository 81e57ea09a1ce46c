"""Turn a Hugging Face config into a DecoderSpec, refusing what we do not implement."""

from __future__ import annotations

from typing import Any

from auto_glm.layers.rotary import SUPPORTED_ROPE_TYPES, RopeSpec
from auto_glm.models.decoder import DecoderSpec

__all__ = ["UnsupportedConfigError", "read_spec"]


class UnsupportedConfigError(ValueError):
    """The checkpoint uses a feature whose math we do not implement."""


def _rope_parameters(config: Any) -> dict:
    # transformers >= 5 normalises rope settings into ``rope_parameters``; older configs keep
    # ``rope_theta`` and ``rope_scaling`` (and GLM ``partial_rotary_factor``) at top level
    params = dict(getattr(config, "rope_parameters", None) or {})
    legacy = getattr(config, "rope_scaling", None) or {}
    for key, value in legacy.items():
        params.setdefault(key, value)
    if "rope_type" not in params and "type" in params:
        params["rope_type"] = params["type"]
    params.setdefault("rope_theta", getattr(config, "rope_theta", 10000.0))
    if getattr(config, "partial_rotary_factor", None) is not None:
        params.setdefault("partial_rotary_factor", config.partial_rotary_factor)
    return params


def _refuse(config: Any, feature: str, fix: str) -> None:
    arch = (getattr(config, "architectures", None) or ["?"])[0]
    raise UnsupportedConfigError(f"{arch}: {feature} is not supported by Open-AutoGLM; {fix}")


def read_spec(
    config: Any,
    *,
    interleaved_rope: bool,
    qkv_bias: bool | None = None,
    o_bias: bool | None = None,
    qk_norm: bool = False,
    sandwich_norm: bool = False,
) -> DecoderSpec:
    """Read every config field that changes the math; a bias left ``None`` follows
    ``attention_bias``."""
    attention_bias = bool(getattr(config, "attention_bias", False))
    act = getattr(config, "hidden_act", "silu")
    if act != "silu":
        _refuse(config, f"hidden_act={act!r}", "only 'silu' gated MLPs are implemented")
    quant = getattr(config, "quantization_config", None)
    # compressed-tensors INT8 checkpoints: the loader checks their scheme itself
    if quant and not (
        isinstance(quant, dict) and quant.get("quant_method") == "compressed-tensors"
    ):
        _refuse(
            config,
            "a pre-quantized checkpoint",
            "use an unquantized (bf16/fp16/fp32) checkpoint, or an INT8 compressed-tensors one",
        )
    layer_types = getattr(config, "layer_types", None) or []
    if getattr(config, "use_sliding_window", False) or "sliding_attention" in layer_types:
        _refuse(config, "sliding-window attention", "set use_sliding_window=false in config.json")
    rope = _rope_parameters(config)
    rope_type = rope.get("rope_type", "default")
    if rope_type not in SUPPORTED_ROPE_TYPES:
        _refuse(
            config,
            f"rope type {rope_type!r}",
            f"supported types: {', '.join(SUPPORTED_ROPE_TYPES)}",
        )
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    rotary_dim = int(head_dim * rope.get("partial_rotary_factor", 1.0))
    if rotary_dim % 2 or rotary_dim <= 0:
        _refuse(config, f"a rotary dimension of {rotary_dim}", "it must be a positive even number")
    scaling = {k: v for k, v in rope.items() if k not in ("rope_type", "type", "rope_theta")}
    return DecoderSpec(
        vocab_size=config.vocab_size,
        hidden_size=config.hidden_size,
        num_layers=config.num_hidden_layers,
        num_heads=config.num_attention_heads,
        num_kv_heads=getattr(config, "num_key_value_heads", None) or config.num_attention_heads,
        head_dim=head_dim,
        intermediate_size=config.intermediate_size,
        rms_norm_eps=config.rms_norm_eps,
        rope=RopeSpec(
            theta=float(rope["rope_theta"]),
            rotary_dim=rotary_dim,
            max_position=config.max_position_embeddings,
            interleaved=interleaved_rope,
            rope_type=rope_type,
            params=scaling,
        ),
        qkv_bias=attention_bias if qkv_bias is None else qkv_bias,
        o_bias=attention_bias if o_bias is None else o_bias,
        mlp_bias=bool(getattr(config, "mlp_bias", False)),
        qk_norm=qk_norm,
        sandwich_norm=sandwich_norm,
        tie_word_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
    )
