"""Markers that a tokenizer makes special tokens (GLM-4.1V's ``<think>``) still reach the
reasoning and tool-call readers, and the stop token that ends a reply is never its text."""

from __future__ import annotations

import pytest

from auto_glm.api import GLMModel
from auto_glm.checkpoints import build_random_vision_checkpoint
from auto_glm.engine.output_processor import RequestOutputProcessor
from auto_glm.sampling_params import SamplingParams
from auto_glm.serving.protocol import ChatCompletionRequest
from auto_glm.serving.reply import plan_reply
from tests.serving.conftest import Served


@pytest.fixture(scope="module")
def vision_model(tmp_path_factory: pytest.TempPathFactory) -> GLMModel:
    path = build_random_vision_checkpoint(tmp_path_factory.mktemp("glm4v"))
    with GLMModel(str(path), device="cpu", dtype="float32") as model:
        yield model


def _body() -> ChatCompletionRequest:
    return ChatCompletionRequest(messages=[{"role": "user", "content": "hi"}])


def test_special_think_tags_are_kept_for_the_reasoning_parser(vision_model: GLMModel) -> None:
    tokenizer = vision_model.tokenizer
    think, end = tokenizer.convert_tokens_to_ids(["<think>", "</think>"])
    assert {think, end} <= set(tokenizer.all_special_ids) or all(
        tokenizer.added_tokens_decoder[i].special for i in (think, end)
    )
    client = vision_model.engine
    plain = plan_reply(_body(), client, "auto", "none").constrain(SamplingParams())
    assert plain.skip_special_tokens  # nothing needs them: the request's choice stands
    plan = plan_reply(_body(), client, "auto", "glm45")
    params = plan.constrain(SamplingParams())
    assert not params.skip_special_tokens

    ids = [think, *tokenizer.encode("plan it", add_special_tokens=False), end]
    ids += tokenizer.encode("the answer", add_special_tokens=False)
    processor = RequestOutputProcessor(tokenizer, params)
    text = processor.process(ids, finished=True).delta_text
    reply = plan.reader().read(text)
    assert (reply.reasoning, reply.content) == ("plan it", "the answer")
    # decoded the default way, the tags vanish and nothing could be split
    dropped = RequestOutputProcessor(tokenizer, SamplingParams()).process(ids, finished=True)
    assert "<think>" not in dropped.delta_text


def test_the_stop_token_is_not_in_the_text_with_special_tokens_kept(served: Served) -> None:
    eos = served.model.tokenizer.eos_token_id
    client = served.openai()
    result = client.completions.create(
        model=served.name,
        prompt="hello",
        max_tokens=5,
        logit_bias={str(eos): 100},
        extra_body={"skip_special_tokens": False},
    )
    choice = result.choices[0]
    assert choice.finish_reason == "stop" and result.usage.completion_tokens == 1
    assert choice.text == ""
    # the same token mid-reply (ignore_eos) is text like any other special token
    kept = client.completions.create(
        model=served.name,
        prompt="hello",
        max_tokens=2,
        logit_bias={str(eos): 100},
        extra_body={"skip_special_tokens": False, "ignore_eos": True},
    )
    eos_text = served.model.tokenizer.eos_token
    assert kept.choices[0].text.replace(" ", "") == eos_text * 2
