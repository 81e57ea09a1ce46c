"""Our GLM-4.1V against transformers' on a tiny random checkpoint, in float32: vision tower,
M-RoPE positions, prompt logits; plus the checkpoint builder and config refusals."""

from __future__ import annotations

import pytest
import torch
import transformers
from transformers import AutoConfig, AutoImageProcessor, AutoTokenizer
from transformers.models.glm4v.image_processing_pil_glm4v import Glm4vImageProcessorPil

from auto_glm.checkpoints import build_random_vision_checkpoint
from auto_glm.engine.inputs import ImageTokenIds, prepare_input_with_images
from auto_glm.loader import load_model
from auto_glm.models import resolve_model_class
from tests.vision_reference import (
    chat_ids,
    hf_logits,
    load_reference,
    make_image,
    prefill_logits_with_images,
)


@pytest.fixture(scope="module")
def path(tmp_path_factory):
    return build_random_vision_checkpoint(tmp_path_factory.mktemp("glm4v"), seed=1)


@pytest.fixture(scope="module")
def ours(path):
    return load_model(str(path), device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def reference(path):
    return load_reference(path)


def _prepare(loaded, images, text="Describe what you see, briefly."):
    model = loaded.model
    tokens = ImageTokenIds(model.image_token_id, model.video_token_id)
    ids = chat_ids(loaded.tokenizer, len(images), text)
    return prepare_input_with_images(
        ids, images, loaded.image_processor, tokens, model.spatial_merge_size
    )


# (width, height) of each image: one; two of different sizes and aspect ratios; none
CASES = {
    "one-image": [(32, 24)],
    "two-images": [(16, 40), (48, 48)],
    "text-only": [],
}


@pytest.mark.parametrize("sizes", CASES.values(), ids=CASES.keys())
def test_logits_match_transformers(ours, reference, sizes):
    images = [make_image(w, h, seed) for seed, (w, h) in enumerate(sizes)]
    prepared = _prepare(ours, images)
    expected = hf_logits(reference, prepared)
    got = prefill_logits_with_images(ours.model, prepared)
    torch.testing.assert_close(got, expected, atol=2e-5, rtol=1e-4)


def test_vision_tower_matches_transformers(ours, reference):
    prepared = _prepare(ours, [make_image(32, 24, 0), make_image(40, 16, 1)])
    pixels = [im.pixel_values for im in prepared.images]
    grids = [im.grid_thw for im in prepared.images]
    with torch.inference_mode():
        got = ours.model.encode_images(pixels, grids)
        expected = reference.model.get_image_features(
            torch.cat(pixels), torch.tensor(grids)
        ).pooler_output
    assert [g.shape[0] for g in got] == [im.num_tokens for im in prepared.images]
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g, e, atol=2e-5, rtol=1e-4)


def test_mrope_positions_match_get_rope_index(ours, reference):
    prepared = _prepare(ours, [make_image(16, 40, 2), make_image(48, 32, 3)])
    ids = torch.tensor([prepared.token_ids])
    image_id = ours.model.image_token_id
    grids = torch.tensor([im.grid_thw for im in prepared.images])
    expected, delta = reference.model.get_rope_index(ids, (ids == image_id).int(), grids)
    offsets = [i for i, t in enumerate(prepared.token_ids) if t == image_id]
    starts = [offsets[0], offsets[prepared.images[0].num_tokens]]
    got, got_delta = ours.model.mrope_positions(
        len(prepared.token_ids),
        [(s, im.grid_thw) for s, im in zip(starts, prepared.images, strict=True)],
    )
    assert torch.equal(got, expected[:, 0])
    assert got_delta == int(delta)


def test_checkpoint_files(path):
    processor = AutoImageProcessor.from_pretrained(path, local_files_only=True)
    assert isinstance(processor, Glm4vImageProcessorPil)
    config = AutoConfig.from_pretrained(path)
    tok = AutoTokenizer.from_pretrained(path)
    for field, token in {
        "image_token_id": "<|image|>",
        "video_token_id": "<|video|>",
        "image_start_token_id": "<|begin_of_image|>",
        "image_end_token_id": "<|end_of_image|>",
        "video_start_token_id": "<|begin_of_video|>",
        "video_end_token_id": "<|end_of_video|>",
    }.items():
        assert getattr(config, field) == tok.convert_tokens_to_ids(token)
    assert config.text_config.vocab_size >= len(tok)


def test_chat_template(path):
    tok = AutoTokenizer.from_pretrained(path)
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What?"}]},
        {"role": "assistant", "content": "A cat."},
        {"role": "tool", "content": "42"},
    ]
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == (
        "[gMASK]<sop><|system|>\nBe brief.<|user|>\n"
        "<|begin_of_image|><|image|><|end_of_image|>What?<|assistant|>\nA cat."
        "<|observation|>\n42<|assistant|>\n"
    )
    no_think = tok.apply_chat_template(
        messages[:2], tokenize=False, add_generation_prompt=True, enable_thinking=False
    )
    assert no_think.endswith("<|assistant|>\n<think></think>\n")
    tool = {"type": "function", "function": {"name": "get_weather", "parameters": {}}}
    with_tools = tok.apply_chat_template(
        [{"role": "user", "content": "hi"}], tools=[tool], tokenize=False
    )
    assert with_tools.startswith("[gMASK]<sop><|system|>\n# Available tools\n\n## get_weather")
    assert with_tools.endswith("<|user|>\nhi")


@pytest.mark.parametrize(
    ("section", "field", "value", "match"),
    [
        ("vision_config", "hidden_act", "gelu", "hidden_act"),
        ("vision_config", "num_heads", 3, "head size"),
        ("text_config", "hidden_act", "gelu", "hidden_act"),
    ],
)
def test_unsupported_config_is_refused(path, section, field, value, match):
    config = transformers.Glm4vConfig.from_pretrained(path)
    setattr(getattr(config, section), field, value)
    with pytest.raises(ValueError, match=match):
        resolve_model_class(config)
