"""The Python API as the design documents use it, on the demo model and a tiny checkpoint."""

from __future__ import annotations

import numpy as np
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


@pytest.mark.parametrize(
    ("options", "said"),
    [
        ({"seed": "7"}, "seed='7' is invalid: it must be an integer, not str"),
        ({"temperature": float("inf")}, "temperature=inf is invalid: it must be a finite number"),
        ({"temperature": "0.5"}, "temperature='0.5' is invalid: it must be a finite number"),
        ({"top_k": 2.5}, "top_k=2.5 is invalid: it must be an integer, not float"),
        ({"ignore_eos": "yes"}, "ignore_eos='yes' is invalid: it must be True or False"),
        ({"logprobs": True}, "logprobs=True is invalid: it must be an integer, not True/False"),
        ({"logit_bias": [(5, 1.0)]}, "logit_bias=[(5, 1.0)] is invalid: it must be a dict"),
        ({"logit_bias": {"5": 1.0}}, "logit_bias keys must be integer token ids, got ['5']"),
        # these overflowed float32 logits, and every sampled token became id 0
        ({"logit_bias": {5: 1e39}}, "logit_bias of token ids [5] is not a number from -100"),
        ({"repetition_penalty": 1e-40}, "repetition_penalty=1e-40 is invalid: it must be in"),
        ({"repetition_penalty": 1e39}, "repetition_penalty=1e+39 is invalid: it must be in"),
        ({"structured_output": "json"}, "structured_output='json' is invalid"),
        ({"max_tokens": 8}, "max_tokens=8: pass max_new_tokens"),
    ],
)
def test_a_wrong_type_is_refused_before_the_engine_which_keeps_serving(model, options, said):
    # a seed of "7" used to reach the sampler, whose TypeError ended the engine's loop
    with pytest.raises(ValueError) as refused:
        model.generate("hi", max_new_tokens=4, **options)
    assert said in str(refused.value)
    assert model.engine.is_alive
    # (ignore_eos: sampled, the random model's end-of-text may come first)
    after = model.generate_batch(["hi"], SamplingParams(max_tokens=2, ignore_eos=True))
    assert len(after[0].token_ids) == 2


def test_a_temperature_below_1e_5_is_greedy_and_a_huge_top_k_is_off(model):
    greedy = model.generate("Once upon", max_new_tokens=8, temperature=0, ignore_eos=True)
    for tiny in (1e-300, 9e-6):
        assert model.generate("Once upon", max_new_tokens=8, temperature=tiny, ignore_eos=True) == (
            greedy
        )
    assert SamplingParams(temperature=9e-6).greedy and not SamplingParams(temperature=1e-5).greedy
    sampled = model.generate("Once upon", max_new_tokens=8, seed=3, ignore_eos=True)
    assert model.generate("Once upon", max_new_tokens=8, seed=3, ignore_eos=True, top_k=2**70) == (
        sampled
    )
    assert SamplingParams(top_k=2**70).top_k == 0 and SamplingParams(top_k=2**31 - 1).top_k > 0


def test_numpy_numbers_are_taken_as_python_numbers(model):
    params = SamplingParams(max_tokens=np.int32(3), temperature=np.float32(0.5), seed=np.int64(9))
    assert (type(params.max_tokens), type(params.temperature), type(params.seed)) == (
        int,
        float,
        int,
    )
    first = model.generate("Once upon", max_new_tokens=np.int64(6), temperature=0.7, seed=9)
    assert first == model.generate("Once upon", max_new_tokens=6, temperature=0.7, seed=9)


@pytest.mark.parametrize(
    ("prompt", "said"),
    [
        (None, "prompt must be text or a list of token ids, got NoneType"),
        (np.array([1, 2]), "got ndarray (convert it with .tolist())"),
        ([1, 2.0], "prompt token ids must be integers, got [2.0]"),
        ([1, True], "prompt token ids must be integers, got [True]"),
    ],
)
def test_a_prompt_of_the_wrong_type_is_named(model, prompt, said):
    with pytest.raises(ValueError) as refused:
        model.generate(prompt, max_new_tokens=2)
    assert said in str(refused.value)
    assert model.generate((1, 2), max_new_tokens=2, temperature=0)  # a tuple is a list


@pytest.mark.parametrize(
    ("messages", "got"), [("Hi", "got a str"), (["Hi"], "got a list holding a str")]
)
def test_chat_names_messages_that_are_not_a_list_of_dicts(model, messages, got):
    with pytest.raises(ValueError) as refused:
        model.chat(messages, max_new_tokens=2)
    assert "messages must be a list of message dicts" in str(refused.value)
    assert str(refused.value).endswith(got)


def test_seeded_sampling_repeats(model):
    first = model.generate("Once upon", max_new_tokens=12, temperature=0.9, seed=11)
    assert model.generate("Once upon", max_new_tokens=12, temperature=0.9, seed=11) == first


def test_default_model_is_the_demo_model():
    with AutoGLM(device="cpu") as demo:
        assert demo.engine.loaded.hf_config.architectures == ["Glm4ForCausalLM"]
        assert isinstance(demo.generate("Hello", max_new_tokens=5), str)
