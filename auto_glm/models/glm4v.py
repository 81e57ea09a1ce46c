"""GLM-4.1V (``Glm4vForConditionalGeneration``): the vision tower and a GLM-4 text decoder
with multimodal rotary (M-RoPE).

Image tokens from :class:`Glm4vVisionModel` replace the embeddings of the prompt's image
placeholder tokens; positions are ``[3, T]`` (temporal, height, width rows, see
:func:`auto_glm.layers.rotary.mrope_positions`). The text decoder is the shared GLM-4 one
(:mod:`auto_glm.models.decoder`): q/k/v bias, sandwich norms, interleaved partial rotary.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch
from torch import nn

from auto_glm.layers.rotary import MRotaryEmbedding, mrope_positions
from auto_glm.models.config_reader import UnsupportedConfigError, read_spec
from auto_glm.models.decoder import CausalLM, DecoderModel, DecoderSpec
from auto_glm.models.glm4v_vision import Glm4vVisionModel, VisionSpec, read_vision_spec

__all__ = ["Glm4vForConditionalGeneration"]

_DEFAULT_MROPE_SECTION = (8, 12, 12)  # transformers' default when the config has none


def _refuse(feature: str, fix: str) -> None:
    raise UnsupportedConfigError(
        f"Glm4vForConditionalGeneration: {feature} is not supported by Open-AutoGLM; {fix}"
    )


def _mrope_section(text_config) -> tuple[int, ...]:
    rope = dict(getattr(text_config, "rope_parameters", None) or {})
    if rope.get("rope_type", "default") != "default":
        _refuse(f"text rope_type={rope['rope_type']!r}", "only 'default' M-RoPE is implemented")
    return tuple(rope.get("mrope_section") or _DEFAULT_MROPE_SECTION)


class Glm4vTextModel(DecoderModel):
    """The GLM-4 decoder with M-RoPE and image embeddings scattered into its input."""

    def __init__(self, spec: DecoderSpec, mrope_section: Sequence[int]) -> None:
        super().__init__(spec)
        self.rotary_emb = MRotaryEmbedding(spec.rope, mrope_section)

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        image_embeds: torch.Tensor | None = None,
        image_rows: torch.Tensor | None = None,
    ) -> torch.Tensor:
        x, residual = self.embed_tokens(input_ids), None  # [T, D]
        if image_embeds is not None:
            x[image_rows] = image_embeds.to(x.dtype)  # [N, D] at rows [N]
        rope = self.rotary_emb.cos_sin(positions, x.dtype)
        for layer in self.layers:
            x, residual = layer(rope, x, residual, self.rotary_emb)
        x, _ = self.norm(x, residual)
        return x


class Glm4vModel(nn.Module):
    def __init__(self, spec: DecoderSpec, vision: VisionSpec, mrope_section: Sequence[int]) -> None:
        super().__init__()
        self.visual = Glm4vVisionModel(vision)
        self.language_model = Glm4vTextModel(spec, mrope_section)


class Glm4vForConditionalGeneration(CausalLM):
    """GLM-4.1V-9B-Thinking and its family: images in, text out."""

    accepts_images = True

    def __init__(self, hf_config) -> None:
        super().__init__(hf_config)
        self.image_token_id: int = hf_config.image_token_id
        self.video_token_id: int = hf_config.video_token_id
        self.spatial_merge_size: int = self.model.visual.spec.spatial_merge_size

    @classmethod
    def spec_from_config(cls, hf_config) -> DecoderSpec:
        if getattr(hf_config, "quantization_config", None):
            _refuse("a pre-quantized checkpoint", "use an unquantized (bf16/fp16/fp32) one")
        text = hf_config.text_config
        head_dim = text.hidden_size // text.num_attention_heads
        if getattr(text, "head_dim", None) not in (None, head_dim):
            _refuse(
                f"text head_dim={text.head_dim} (GLM-4.1V uses hidden_size / heads = {head_dim})",
                "remove head_dim from text_config",
            )
        _mrope_section(text)
        read_vision_spec(hf_config.vision_config)
        spec = read_spec(
            text, interleaved_rope=True, qkv_bias=True, o_bias=False, sandwich_norm=True
        )
        tie = bool(getattr(hf_config, "tie_word_embeddings", False))
        return dataclasses.replace(spec, tie_word_embeddings=tie)

    def build_model(self, hf_config) -> Glm4vModel:
        vision = read_vision_spec(hf_config.vision_config)
        return Glm4vModel(self.spec, vision, _mrope_section(hf_config.text_config))

    def language_model(self) -> Glm4vTextModel:
        return self.model.language_model

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        image_embeds: torch.Tensor | None = None,
        image_rows: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """input_ids: [T]; positions: [3, T] M-RoPE rows; image_embeds: [N, D] written over
        the embeddings at ``image_rows`` [N] -> hidden states [T, D]."""
        return self.model.language_model(input_ids, positions, image_embeds, image_rows)

    def encode_images(
        self, pixel_values: Sequence[torch.Tensor], grids: Sequence[tuple[int, int, int]]
    ) -> list[torch.Tensor]:
        """Vision tower over several images at once: pixel_values[i] [N_i, patch_dim] with
        grid (t, h, w) in patches -> per image its tokens [t * h * w / merge**2, D]."""
        embeds = self.model.visual(torch.cat(list(pixel_values)), list(grids))
        sizes = [t * h * w // self.spatial_merge_size**2 for t, h, w in grids]
        return list(embeds.split(sizes))

    def merged_grid(self, grid: tuple[int, int, int]) -> tuple[int, int, int]:
        """The (t, h, w) token grid of an image whose patch grid is ``grid``."""
        t, h, w = grid
        return t, h // self.spatial_merge_size, w // self.spatial_merge_size

    def mrope_positions(
        self, num_tokens: int, images: Sequence[tuple[int, tuple[int, int, int]]]
    ) -> tuple[torch.Tensor, int]:
        """M-RoPE rows [3, num_tokens] and decode delta of a prompt whose images sit at
        ``(offset, patch grid)``."""
        return mrope_positions(num_tokens, [(o, self.merged_grid(g)) for o, g in images])
