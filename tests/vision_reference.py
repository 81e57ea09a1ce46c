"""Reference outputs from transformers' GLM-4.1V, and test images and prompts for it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image
from transformers import Glm4vForConditionalGeneration

from auto_glm.engine.inputs import EngineInput, ImageTokenIds, image_offsets
from auto_glm.layers.attention import AttentionMetadata, PrefillChunk, attention_metadata


def make_image(width: int, height: int, seed: int) -> Image.Image:
    """A gradient with seeded noise on top: each seed and size gives a distinct image."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack((x * 255 / width, y * 255 / height, (x + y) * 127 / (width + height)), -1)
    pixels = np.clip(base + rng.normal(0, 40, base.shape), 0, 255).astype(np.uint8)
    return Image.fromarray(pixels, "RGB")


def chat_ids(tokenizer, num_images: int, text: str) -> list[int]:
    """The chat template's rendering of one user turn: images first, then ``text``."""
    content = [{"type": "image"}] * num_images + [{"type": "text", "text": text}]
    messages = [{"role": "user", "content": content}]
    rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return tokenizer.encode(rendered, add_special_tokens=False)


def mixed_batch(model) -> list[EngineInput]:
    """Three requests for a :class:`~auto_glm.GLMModel` of GLM-4.1V to run at once: one
    image, two images of other sizes, none (12, 10 and 36 image tokens on the tiny model)."""
    prepare, tok = model.engine.prepare, model.tokenizer
    return [
        prepare(chat_ids(tok, 1, "What is in this picture?"), [make_image(32, 24, 0)]),
        prepare(
            chat_ids(tok, 2, "Compare the two images."),
            [make_image(16, 40, 1), make_image(48, 48, 2)],
        ),
        prepare(chat_ids(tok, 0, "Hello there"), []),
    ]


def load_reference(path: Path) -> Glm4vForConditionalGeneration:
    return Glm4vForConditionalGeneration.from_pretrained(path, dtype=torch.float32).eval()


def _hf_inputs(model, prepared: EngineInput) -> dict:
    ids = torch.tensor([prepared.token_ids])
    inputs = {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "mm_token_type_ids": (ids == model.config.image_token_id).int(),
    }
    if prepared.images:
        inputs["pixel_values"] = torch.cat([im.pixel_values for im in prepared.images])
        inputs["image_grid_thw"] = torch.tensor([im.grid_thw for im in prepared.images])
    return inputs


def hf_logits(model, prepared: EngineInput) -> torch.Tensor:
    """[T, vocab] logits of the whole prompt."""
    with torch.inference_mode():
        return model(**_hf_inputs(model, prepared)).logits[0]


def hf_greedy(model, prepared: list[EngineInput], max_new_tokens: int) -> list[list[int]]:
    """Greedy continuation of each prompt, EOS ignored."""
    outputs = []
    with torch.inference_mode():
        for item in prepared:
            out = model.generate(
                **_hf_inputs(model, item),
                do_sample=False,
                max_new_tokens=max_new_tokens,
                min_new_tokens=max_new_tokens,
            )
            outputs.append(out[0, len(item.token_ids) :].tolist())
    return outputs


def prefill_logits_with_images(model, prepared: EngineInput) -> torch.Tensor:
    """One full-prompt prefill of our model, images encoded, with a scratch cache."""
    spec = model.spec
    n = len(prepared.token_ids)
    for attn in model.attention_layers():
        attn.k_cache = torch.zeros(n, spec.num_kv_heads, spec.head_dim)
        attn.v_cache = torch.zeros_like(attn.k_cache)
    ids = torch.tensor(prepared.token_ids)
    offsets = image_offsets(prepared.token_ids, _tokens(model), prepared.images)
    positions, _ = model.mrope_positions(
        n, [(o, im.grid_thw) for o, im in zip(offsets, prepared.images, strict=True)]
    )
    md = AttentionMetadata(slot_mapping=torch.arange(n), prefills=[PrefillChunk(0, n)])
    with torch.inference_mode(), attention_metadata(md):
        embeds = rows = None
        if prepared.images:
            grids = [im.grid_thw for im in prepared.images]
            embeds = torch.cat(
                model.encode_images([im.pixel_values for im in prepared.images], grids)
            )
            rows = (ids == model.image_token_id).nonzero()[:, 0]
        return model.compute_logits(model(ids, positions, embeds, rows))


def _tokens(model) -> ImageTokenIds:
    return ImageTokenIds(model.image_token_id, model.video_token_id)
