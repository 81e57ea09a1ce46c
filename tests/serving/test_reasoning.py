"""Reasoning split, special tokens and harmless fields through real servers.

The random model writes no ``</think>`` by itself: a JSON-schema grammar (``enum`` of one
string) makes it write text holding the tags, so what the server does with them is real.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc
import httpx
import pytest

from auto_glm.rpc.v1 import inference_pb2 as pb
from auto_glm.rpc.v1 import inference_pb2_grpc as pb_grpc
from tests.serving.conftest import Served, free_port, start_service, stop_service

pytestmark = pytest.mark.integration

USER = [{"role": "user", "content": "Think, then answer."}]


def _forced(text: str) -> dict:
    schema = {"type": "string", "enum": [text]}
    return {
        "response_format": {"type": "json_schema", "json_schema": {"name": "t", "schema": schema}},
        "temperature": 0,
        "max_tokens": 60,
    }


@pytest.fixture(scope="module")
def thinking(tiny_checkpoint: Path) -> Iterator[Served]:
    served, thread = start_service(
        tiny_checkpoint, reasoning_parser="deepseek_r1", grpc_port=free_port()
    )
    yield served
    stop_service(served, thread)


def _stream(served: Served, **options) -> tuple[str, str]:
    stream = served.openai().chat.completions.create(
        model=served.name, messages=USER, stream=True, **options
    )
    reasoning = content = ""
    for chunk in stream:
        for choice in chunk.choices:
            reasoning += getattr(choice.delta, "reasoning_content", None) or ""
            content += choice.delta.content or ""
    return reasoning, content


def test_reasoning_moves_out_of_the_content_streamed_or_not(thinking: Served) -> None:
    options = _forced("plan it</think>answer")
    reply = thinking.openai().chat.completions.create(model=thinking.name, messages=USER, **options)
    message = reply.choices[0].message
    # the reply is the JSON string "plan it</think>answer", quotes included
    assert (message.reasoning_content, message.content) == ('"plan it', 'answer"')
    assert _stream(thinking, **options) == ('"plan it', 'answer"')


def test_an_unfinished_block_is_all_reasoning(thinking: Served) -> None:
    reply = thinking.openai().chat.completions.create(
        model=thinking.name, messages=USER, temperature=0, max_tokens=12
    )
    message = reply.choices[0].message
    assert message.content == "" and message.reasoning_content
    assert _stream(thinking, temperature=0, max_tokens=12) == (message.reasoning_content, "")


def test_grpc_chat_splits_the_reasoning_as_rest_does(thinking: Served) -> None:
    message = (
        thinking.openai()
        .chat.completions.create(model=thinking.name, messages=USER, temperature=0, max_tokens=12)
        .choices[0]
        .message
    )
    request = pb.ChatRequest(
        messages=[pb.ChatMessage(**m) for m in USER],
        sampling=pb.SamplingOptions(temperature=0, max_tokens=12),
    )
    with grpc.insecure_channel(f"127.0.0.1:{thinking.service.config.grpc_port}") as channel:
        responses = list(pb_grpc.InferenceStub(channel).Chat(request, timeout=60))
    reasoning = "".join(r.reasoning for r in responses)
    text = "".join(r.text for r in responses)
    assert (reasoning, text) == (message.reasoning_content, "")
    assert sum(len(r.token_ids) for r in responses) == 12


def test_by_default_think_tags_stay_in_the_content(served: Served) -> None:
    options = _forced("<think>plan</think>answer")
    reply = served.openai().chat.completions.create(model=served.name, messages=USER, **options)
    message = reply.choices[0].message
    assert message.content == '"<think>plan</think>answer"'
    assert message.reasoning_content is None
    assert _stream(served, **options) == ("", message.content)


def _completion(served: Served, **body) -> str:
    response = httpx.post(
        f"{served.base_url}/v1/completions",
        json={"prompt": "hi", "temperature": 0, "max_tokens": 3, **body},
    )
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]["text"]


def test_special_tokens_are_shown_on_request_with_or_without_spaces(served: Served) -> None:
    system = served.model.tokenizer.convert_tokens_to_ids("<|system|>")
    bias = {"logit_bias": {str(system): 100}}  # three <|system|> tokens, not end-of-text
    assert _completion(served, **bias) == ""
    shown = _completion(served, skip_special_tokens=False, **bias)
    assert shown == "<|system|> <|system|> <|system|>"
    tight = _completion(
        served, skip_special_tokens=False, spaces_between_special_tokens=False, **bias
    )
    assert tight == "<|system|><|system|><|system|>"
    stream = served.openai().completions.create(
        model=served.name,
        prompt="hi",
        temperature=0,
        max_tokens=3,
        stream=True,
        extra_body={"skip_special_tokens": False, **bias},
    )
    assert "".join(chunk.choices[0].text for chunk in stream if chunk.choices) == shown


def test_harmless_fields_change_nothing_and_unknown_ones_are_refused(served: Served) -> None:
    def chat(**extra) -> httpx.Response:
        body = {"messages": USER, "temperature": 0, "max_tokens": 6, **extra}
        return httpx.post(f"{served.base_url}/v1/chat/completions", json=body)

    plain = chat().json()["choices"][0]["message"]
    harmless = {
        "store": True,
        "metadata": {"team": "search"},
        "service_tier": "auto",
        "parallel_tool_calls": False,
    }
    for field, value in harmless.items():
        response = chat(**{field: value})
        assert response.status_code == 200, (field, response.text)
        assert response.json()["choices"][0]["message"] == plain
    refused = chat(prediction={"type": "content", "content": "x"})
    assert refused.status_code == 422
    assert refused.json()["error"]["param"] == "prediction"
