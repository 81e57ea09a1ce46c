"""``response_format`` and ``logit_bias`` through the OpenAI client against a real server.

The model is tiny and random: it writes no JSON by itself, so every valid reply below is
the grammar's doing.
"""

from __future__ import annotations

import asyncio
import json

import httpx
import jsonschema
import openai
import pytest

from tests.schemas import PERSON_SCHEMA as SCHEMA
from tests.serving.conftest import Served

pytestmark = pytest.mark.integration

USER = [{"role": "user", "content": "Describe a person as JSON."}]
PERSON = {
    "type": "json_schema",
    "json_schema": {"name": "person", "schema": SCHEMA, "strict": True},
}


def test_fifty_sampled_replies_all_follow_the_schema(served: Served) -> None:
    client = served.openai(timeout=120)
    replies = []
    for call in range(5):
        reply = client.chat.completions.create(
            model=served.name,
            messages=USER,
            response_format=PERSON,
            temperature=1.0,
            seed=100 * call,
            n=10,
            max_tokens=256,
        )
        replies.extend(reply.choices)
    assert len(replies) == 50
    for choice in replies:
        jsonschema.validate(json.loads(choice.message.content), SCHEMA)
        assert choice.finish_reason == "stop"
    assert len({c.message.content for c in replies}) > 40  # sampled, not one answer repeated


def test_json_object_reply_is_an_object(served: Served) -> None:
    close = served.model.tokenizer.convert_tokens_to_ids("}")
    reply = served.openai().chat.completions.create(
        model=served.name,
        messages=USER,
        response_format={"type": "json_object"},
        temperature=0,
        logit_bias={str(close): 50},  # closes the object as soon as the grammar allows
        max_tokens=20,
    )
    assert json.loads(reply.choices[0].message.content) == {}
    assert reply.choices[0].finish_reason == "stop"


def test_constrained_and_plain_calls_share_a_batch(served: Served) -> None:
    async def scenario():
        client = served.async_openai()

        async def plain():
            reply = await client.completions.create(
                model=served.name,
                prompt="hello",
                temperature=0,
                max_tokens=12,
                extra_body={"ignore_eos": True},
            )
            return reply.choices[0].text

        async def person():
            reply = await client.chat.completions.create(
                model=served.name,
                messages=USER,
                response_format=PERSON,
                temperature=1.0,
                n=4,
                max_tokens=256,
            )
            return [c.message.content for c in reply.choices]

        alone = await plain()
        together = await asyncio.gather(plain(), person(), plain())
        await client.close()
        return alone, together

    alone, (first, people, second) = asyncio.run(scenario())
    assert first == second == alone
    for content in people:
        jsonschema.validate(json.loads(content), SCHEMA)


def test_unenforceable_schema_is_400_and_the_server_stays_healthy(served: Served) -> None:
    client = served.openai()
    bad = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "foo"}}}
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model=served.name, messages=USER, response_format=bad)
    error = caught.value.body
    assert (error["code"], error["param"]) == ("invalid_schema", "response_format")
    assert "Invalid type: foo" in error["message"] and "fix the schema" in error["message"]
    assert httpx.get(f"{served.base_url}/health").status_code == 200
    reply = client.chat.completions.create(model=served.name, messages=USER, max_tokens=3)
    assert reply.choices[0].finish_reason in ("length", "stop")
    served.wait_idle()


ENDLESS = {  # compiles, then llguidance gives up at the first token ("too complex")
    "type": "json_schema",
    "json_schema": {
        "name": "endless",
        "schema": {"type": "object", "properties": {"a": {"$ref": "#"}}, "required": ["a"]},
    },
}


def test_a_schema_that_fails_mid_reply_is_the_requests_fault_not_a_500(served: Served) -> None:
    # it was 500 engine_error: a client's schema raised the server's 5xx rate (an alert)
    client = served.openai()
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(
            model=served.name, messages=USER, response_format=ENDLESS, max_tokens=8
        )
    error = caught.value.body
    assert error["code"] == "invalid_schema" and error["type"] == "invalid_request_error"
    assert (
        "structured output failed" in error["message"] and "simplify the schema" in error["message"]
    )
    stream = client.chat.completions.create(
        model=served.name, messages=USER, response_format=ENDLESS, max_tokens=8, stream=True
    )
    with pytest.raises(openai.APIError) as streamed:
        list(stream)
    assert streamed.value.body["code"] == "invalid_schema"
    assert httpx.get(f"{served.base_url}/health").status_code == 200
    served.wait_idle()


def test_json_schema_without_a_schema_is_400(served: Served) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        served.openai().chat.completions.create(
            model=served.name,
            messages=USER,
            response_format={"type": "json_schema", "json_schema": {"name": "x"}},
        )
    assert caught.value.body["param"] == "response_format.json_schema"
    assert "needs its schema" in caught.value.body["message"]


def test_text_response_format_changes_nothing(served: Served) -> None:
    client = served.openai()
    kwargs = {"model": served.name, "messages": USER, "temperature": 0, "max_tokens": 8}
    plain = client.chat.completions.create(**kwargs)
    text = client.chat.completions.create(response_format={"type": "text"}, **kwargs)
    assert text.choices[0].message.content == plain.choices[0].message.content


def _token_id(served: Served, text: str) -> int:
    [token_id] = served.model.tokenizer.encode(text, add_special_tokens=False)
    return token_id


def test_logit_bias_of_100_forces_one_token(served: Served) -> None:
    token = _token_id(served, "ing")
    reply = served.openai().completions.create(
        model=served.name,
        prompt="hello",
        temperature=0,
        max_tokens=8,
        logit_bias={str(token): 100},
        extra_body={"ignore_eos": True},
    )
    assert reply.choices[0].text == "ing" * 8
    assert reply.usage.completion_tokens == 8


def test_logit_bias_of_minus_100_removes_the_greedy_token(served: Served) -> None:
    client = served.openai()
    kwargs = {"model": served.name, "prompt": "hello", "temperature": 0, "max_tokens": 1}
    greedy = client.completions.create(**kwargs, logprobs=0)
    token = greedy.choices[0].logprobs.tokens[0]
    banned = client.completions.create(
        **kwargs, logprobs=0, logit_bias={str(_token_id(served, token)): -100}
    )
    assert banned.choices[0].logprobs.tokens[0] != token


@pytest.mark.parametrize(
    ("bias", "status", "words"),
    [
        ({"ing": 5}, 400, "logit_bias key 'ing' is not a token id"),
        ({"-3": 5}, 400, "logit_bias key '-3' is not a token id"),
        ({"1000000": 5}, 400, "[1000000] are outside the vocabulary"),
        ({"1": 101}, 422, "less than or equal to 100"),
    ],
)
def test_bad_logit_bias_is_refused_naming_the_problem(
    served: Served, bias: dict, status: int, words: str
) -> None:
    response = httpx.post(
        f"{served.base_url}/v1/completions",
        json={"model": served.name, "prompt": "hi", "logit_bias": bias},
        timeout=30,
    )
    assert response.status_code == status, response.text
    assert words in response.json()["error"]["message"]
    served.wait_idle()
