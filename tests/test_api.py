"""The Python API as the design documents use it, on the demo model and a tiny checkpoint."""

from __future__ import annotations

import pytest

from auto_glm import AutoGLM, AutoGLMModel, GLMModel, SamplingParams


@pytest.fixture(scope="module")
def model(make_checkpoint):
    path = make_checkpoint("Glm4ForCausalLM", seed=4)
    with GLMModel.from_pretrained(str(path), device="cpu", dtype="float32") as m:
        yield m


def test_names_are_one_class():
    assert AutoGLM is GLMModel and AutoGLMModel is GLMModel


def test_generate_returns_text_and_stream_yields_the_same(model):
    text = model.generate("The weather today", max_new_tokens=16, temperature=0)
    pieces = list(model.stream("The weather today", max_new_tokens=16, temperature=0))
    assert isinstance(text, str) and text
    assert "".join(pieces) == text
    assert len(pieces) > 1


def test_batch_form_takes_text_and_token_ids(model):
    ids = model.tokenizer.encode("The weather today", add_special_tokens=True)
    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    by_text, by_ids, other = model.generate_batch(["The weather today", ids, "Once upon"], params)
    assert by_text.prompt_token_ids == ids
    assert by_text.token_ids == by_ids.token_ids and by_text.text == by_ids.text
    assert len(other.token_ids) == 8
    assert {r.finish_reason for r in (by_text, by_ids, other)} == {"length"}


def test_chat_uses_the_chat_template(model):
    messages = [{"role": "user", "content": "hello there"}]
    reply = model.chat(messages, max_new_tokens=10, temperature=0)
    prompt = model.tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True
    )
    ids = model.tokenizer.encode(prompt, add_special_tokens=False)
    expected = model.generate_batch([ids], SamplingParams(max_tokens=10, temperature=0))[0]
    assert reply == expected.text


def test_sampling_options_are_validated(model):
    with pytest.raises(ValueError, match="top_p"):
        model.generate("hi", top_p=1.5)
    with pytest.raises(ValueError, match="max_tokens"):
        model.generate("hi", max_new_tokens=0)


def test_seeded_sampling_repeats(model):
    first = model.generate("Once upon", max_new_tokens=12, temperature=0.9, seed=11)
    assert model.generate("Once upon", max_new_tokens=12, temperature=0.9, seed=11) == first


def test_default_model_is_the_demo_model():
    with AutoGLM(device="cpu") as demo:
        assert demo.engine.loaded.hf_config.architectures == ["Glm4ForCausalLM"]
        assert isinstance(demo.generate("Hello", max_new_tokens=5), str)
