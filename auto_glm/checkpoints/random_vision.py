"""A tiny random-weight GLM-4.1V (``Glm4vForConditionalGeneration``) checkpoint.

transformers writes the weights and config itself; the tokenizer carries GLM-4.1V's special
tokens (their ids are wired into the config) and a chat template of ours that renders its
conversation format; ``preprocessor_config.json`` configures transformers' GLM-4.1V image
processor with small patches and pixel limits, so test images stay cheap.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import transformers
from transformers.models.glm4v.image_processing_pil_glm4v import Glm4vImageProcessorPil

from auto_glm.checkpoints.random_model import _randomise
from auto_glm.checkpoints.tokenizer import (
    EOS_TOKEN,
    EXTRA_EOS_TOKENS,
    SPECIAL_TOKENS,
    build_tokenizer,
)

__all__ = [
    "VISION_CHAT_TEMPLATE",
    "VISION_SPECIAL_TOKENS",
    "VISION_TOKEN_FIELDS",
    "build_random_vision_checkpoint",
]

VISION_SPECIAL_TOKENS = (
    *SPECIAL_TOKENS,
    "[sMASK]",
    "<|begin_of_image|>",
    "<|end_of_image|>",
    "<|begin_of_video|>",
    "<|end_of_video|>",
    "<|image|>",
    "<|video|>",
    "<|begin_of_box|>",
    "<|end_of_box|>",
    "<think>",
    "</think>",
)
# config.json field -> its token
VISION_TOKEN_FIELDS = {
    "image_token_id": "<|image|>",
    "video_token_id": "<|video|>",
    "image_start_token_id": "<|begin_of_image|>",
    "image_end_token_id": "<|end_of_image|>",
    "video_start_token_id": "<|begin_of_video|>",
    "video_end_token_id": "<|end_of_video|>",
}

# GLM-4.1V layout: "[gMASK]<sop>", a system turn listing the tools (if any), then
# "<|role|>\n" + content per turn. A content list renders its text items as they are and
# each image (video) item as one placeholder between begin/end tokens; the engine expands
# the placeholder to the image's token count. enable_thinking=false pre-fills an empty
# thought, as GLM's hybrid-thinking templates do.
VISION_CHAT_TEMPLATE = (
    "{%- set tags = {'system': '<|system|>', 'user': '<|user|>', 'assistant': '<|assistant|>',"
    " 'observation': '<|observation|>', 'tool': '<|observation|>'} -%}"
    "{%- macro render(content) -%}"
    "{%- if content is string -%}{{ content }}"
    "{%- elif content is not none -%}{%- for item in content -%}"
    "{%- if item['type'] == 'text' -%}{{ item['text'] }}"
    "{%- elif item['type'] == 'image' -%}{{ '<|begin_of_image|><|image|><|end_of_image|>' }}"
    "{%- elif item['type'] == 'video' -%}{{ '<|begin_of_video|><|video|><|end_of_video|>' }}"
    "{%- else -%}{{ raise_exception('unsupported content type ' ~ item['type']"
    " ~ '; use text, image or video') }}"
    "{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{%- endmacro -%}"
    "{{ '[gMASK]<sop>' }}"
    "{%- if tools -%}"
    "{{ '<|system|>\\n# Available tools' }}"
    "{%- for tool in tools -%}"
    "{%- set fn = tool['function'] if tool['function'] is defined else tool -%}"
    "{{ '\\n\\n## ' ~ fn['name'] ~ '\\n\\n' }}{{ fn | tojson(indent=4) }}"
    "{%- endfor -%}"
    "{{ '\\nTo call a tool, reply with its name on one line and its arguments as JSON on"
    " the next.' }}"
    "{%- endif -%}"
    "{%- for message in messages -%}"
    "{%- if message['role'] not in tags -%}"
    "{{ raise_exception('unsupported chat role ' ~ message['role']"
    " ~ '; use system, user, assistant, observation or tool') }}"
    "{%- endif -%}"
    "{{ tags[message['role']] ~ '\\n' }}{{ render(message['content']) }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|assistant|>\\n' }}"
    "{%- if enable_thinking is defined and not enable_thinking -%}{{ '<think></think>\\n' }}"
    "{%- endif -%}"
    "{%- endif -%}"
)

_TEXT: dict[str, Any] = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "max_position_embeddings": 512,
    # head_dim 32, half of it rotates: 8 frequencies, split 2/3/3 over t, h, w
    "rope_parameters": {
        "rope_type": "default",
        "rope_theta": 10000.0,
        "partial_rotary_factor": 0.5,
        "mrope_section": [2, 3, 3],
    },
}
_VISION: dict[str, Any] = {
    "depth": 2,
    "hidden_size": 32,
    "num_heads": 2,
    "intermediate_size": 96,
    "image_size": 32,
    "patch_size": 4,
    "temporal_patch_size": 2,
    "spatial_merge_size": 2,
    "rope_parameters": {"rope_type": "axial", "rope_theta": 10000.0},
}
_VOCAB_ALIGN = 64


def build_random_vision_checkpoint(
    directory: str | Path,
    seed: int = 0,
    text_overrides: dict[str, Any] | None = None,
    vision_overrides: dict[str, Any] | None = None,
    dtype: torch.dtype = torch.float32,
    min_pixels: int = 2 * 16 * 16,
    max_pixels: int = 2 * 48 * 48,
) -> Path:
    """Write a random-weight GLM-4.1V checkpoint, its tokenizer and image processor config.

    ``text_overrides`` / ``vision_overrides`` replace fields of the tiny text / vision
    configs. ``min_pixels`` / ``max_pixels`` bound ``2 * height * width`` of a resized
    image (the image processor counts the two temporal copies of a still image), so an
    image becomes at most ``max_pixels / (2 * patch**2 * merge**2)`` tokens.
    """
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer(
        out,
        vocab_size=1024,
        special_tokens=VISION_SPECIAL_TOKENS,
        chat_template=VISION_CHAT_TEMPLATE,
    )
    ids = {field: tok.convert_tokens_to_ids(token) for field, token in VISION_TOKEN_FIELDS.items()}
    eos_ids = [tok.convert_tokens_to_ids(t) for t in (EOS_TOKEN, *EXTRA_EOS_TOKENS)]
    text = {
        **_TEXT,
        "vocab_size": -(-len(tok) // _VOCAB_ALIGN) * _VOCAB_ALIGN,
        "pad_token_id": eos_ids[0],
        **(text_overrides or {}),
    }
    vision = {**_VISION, "out_hidden_size": text["hidden_size"], **(vision_overrides or {})}
    config = transformers.Glm4vConfig(
        architectures=["Glm4vForConditionalGeneration"],
        text_config=text,
        vision_config=vision,
        eos_token_id=eos_ids[0],
        **ids,
    )
    torch.manual_seed(seed)
    model = transformers.Glm4vForConditionalGeneration(config)
    _randomise(model, seed)
    model.to(dtype).save_pretrained(str(out))
    generation = {"eos_token_id": eos_ids, "pad_token_id": eos_ids[0]}
    (out / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    processor = Glm4vImageProcessorPil(
        patch_size=vision["patch_size"],
        temporal_patch_size=vision["temporal_patch_size"],
        merge_size=vision["spatial_merge_size"],
        size={"shortest_edge": min_pixels, "longest_edge": max_pixels},
    )
    processor.save_pretrained(str(out))
    return out
