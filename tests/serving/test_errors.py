"""Every failure is an OpenAI-shaped error with a consistent status code."""

from __future__ import annotations

from pathlib import Path

import httpx
import openai
import pytest

from tests.serving.conftest import Served, start_service, stop_service

pytestmark = pytest.mark.integration


def error_of(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    return error


def post(served: Served, path: str, **kwargs) -> httpx.Response:
    return httpx.post(f"{served.base_url}{path}", timeout=30, **kwargs)


def test_malformed_json_is_400(served: Served) -> None:
    response = post(
        served,
        "/v1/chat/completions",
        content=b'{"messages": [',
        headers={"content-type": "application/json"},
    )
    assert error_of(response, 400)["code"] == "json_invalid"


def test_prompt_too_long_is_400_naming_the_limit(served: Served) -> None:
    limit = served.model.engine.max_model_len
    with pytest.raises(openai.BadRequestError) as caught:
        served.openai().completions.create(model=served.name, prompt=[5] * (limit + 1))
    assert str(limit) in caught.value.body["message"]
    assert "max_model_len" in caught.value.body["message"]
    # the code OpenAI gives, which clients test for to shorten the prompt and retry
    assert caught.value.code == "context_length_exceeded"
    assert caught.value.body["param"] == "prompt"
    served.wait_idle()


@pytest.mark.parametrize(
    ("path", "body", "param", "code", "said"),
    [
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x " * 9000}]},
         "messages", "context_length_exceeded", "max_model_len"),
        ("/generate", {"prompt": "x " * 9000}, "prompt", "context_length_exceeded",
         "max_model_len"),
        ("/v1/completions", {"prompt": ""}, "prompt", "invalid_prompt", "prompt is empty"),
        ("/generate", {"prompt": ""}, "prompt", "invalid_prompt", "prompt is empty"),
    ],
)  # fmt: skip
def test_a_prompt_the_engine_refuses_names_the_field_it_came_from(
    served: Served, path: str, body: dict, param: str, code: str, said: str
) -> None:
    # refused when submitted, after the chat template: the param was null
    error = error_of(post(served, path, json=body), 400)
    assert (error["code"], error["param"]) == (code, param)
    assert said in error["message"], error


def test_a_chat_without_max_tokens_runs_to_what_a_short_kv_cache_holds(
    tiny_checkpoint: Path,
) -> None:
    """A KV cache shorter than the model's context clamps max_model_len, so a chat call
    without max_tokens (the context's rest) runs to the cache's end; it was refused, "the
    cache holds only ...", on every such server."""
    served, thread = start_service(tiny_checkpoint, kv_cache_memory=64 << 10)
    try:
        limit = served.model.engine.num_blocks * served.model.engine.config.block_size + 1
        [card] = httpx.get(f"{served.base_url}/v1/models").json()["data"]
        assert card["max_model_len"] == limit < served.model.engine.loaded.max_model_len
        body = {"messages": [{"role": "user", "content": "hi"}], "ignore_eos": True}
        reply = post(served, "/v1/chat/completions", json=body)
        assert reply.status_code == 200, reply.text
        usage = reply.json()["usage"]
        assert usage["total_tokens"] == limit
        assert reply.json()["choices"][0]["finish_reason"] == "length"
    finally:
        stop_service(served, thread)


def test_token_id_outside_vocabulary_is_400(served: Served) -> None:
    error = error_of(post(served, "/v1/completions", json={"prompt": [10**6]}), 400)
    assert "vocabulary" in error["message"]


def test_unknown_model_is_404(served: Served) -> None:
    with pytest.raises(openai.NotFoundError) as caught:
        served.openai().chat.completions.create(
            model="gpt-nonexistent", messages=[{"role": "user", "content": "hi"}]
        )
    assert caught.value.body["code"] == "model_not_found"
    assert caught.value.body["param"] == "model"
    assert served.name in caught.value.body["message"]
    assert error_of(httpx.get(f"{served.base_url}/v2/nothing"), 404)["type"] == "not_found_error"


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"prompt": "x", "max_tokens": "many"}, "max_tokens"),  # wrong type
        ({"prompt": "x", "temperature": 3}, "temperature"),  # out of range
        ({"prompt": "x", "n": 0}, "n"),
        ({"prompt": "x", "logit_bias": {"1": 200}}, "logit_bias.1"),  # bias beyond 100
        ({"prompt": "x", "repetition_penalty": 1e-40}, "repetition_penalty"),  # overflows
        ({"prompt": {"text": "x"}}, "prompt"),  # fits no member of the union
        ({}, "prompt"),  # missing
    ],
)
def test_schema_violations_are_422_naming_the_field(served: Served, body: dict, param: str) -> None:
    error = error_of(post(served, "/v1/completions", json=body), 422)
    assert error["param"] == param and error["type"] == "invalid_request_error"


def test_chat_schema_violation_through_the_client_is_422(served: Served) -> None:
    with pytest.raises(openai.UnprocessableEntityError) as caught:
        served.openai().chat.completions.create(
            model=served.name, messages=[{"role": "wizard", "content": "hi"}]
        )
    assert caught.value.body["param"] == "messages.0.role"


def test_semantic_errors_are_400(served: Served) -> None:
    body = {"messages": [{"role": "user", "content": "hi"}], "top_logprobs": 2}
    assert error_of(post(served, "/v1/chat/completions", json=body), 400)["param"] == "top_logprobs"
    body = {"prompt": ["a"] * 4, "n": 5}
    assert error_of(post(served, "/v1/completions", json=body), 400)["param"] == "n"


def test_request_timeout_ends_the_request_with_504(served: Served) -> None:
    admission = served.admission
    admission.request_timeout = 0.2
    try:
        body = {"prompt": "slow", "max_tokens": 400, "ignore_eos": True, "n": 8}
        error = error_of(post(served, "/v1/completions", json=body), 504)
        assert error["type"] == "timeout_error" and "request_timeout" in error["message"]
        stream = served.openai().completions.create(
            model=served.name,
            prompt="slow",
            max_tokens=400,
            n=8,
            stream=True,
            extra_body={"ignore_eos": True},
        )
        with pytest.raises(openai.APIError, match="request_timeout"):
            list(stream)
    finally:
        admission.request_timeout = served.service.config.request_timeout
    served.wait_idle()  # the timed-out requests were aborted and their KV freed


@pytest.mark.parametrize(
    ("content_type", "shown"),
    [
        (None, "application/x-www-form-urlencoded"),  # what curl -d sends without -H
        ("text/plain", "text/plain"),
        ("multipart/form-data; boundary=x", "multipart/form-data"),
    ],
)
def test_a_body_not_sent_as_json_is_415_naming_the_header_to_send(
    served: Served, content_type: str | None, shown: str
) -> None:
    body = b'{"prompt": "Hello", "max_tokens": 2}'
    if content_type is None:  # httpx's form encoding, as curl -d
        response = post(served, "/v1/completions", data={"prompt": "Hello"})
    else:
        response = post(
            served, "/v1/completions", content=body, headers={"content-type": content_type}
        )
    error = error_of(response, 415)
    assert error["code"] == "unsupported_media_type"
    assert shown in error["message"]
    assert "-H 'Content-Type: application/json'" in error["message"]


def test_a_json_body_without_content_type_is_415_saying_to_add_it(served: Served) -> None:
    """(requests.post(url, data=TEXT) sends none; the answer was "must be a JSON object with
    the request's fields, got an object")"""
    for body in (b'{"prompt": "Hello", "max_tokens": 2}', b'{"prompt": "Hel'):
        request = httpx.Request("POST", f"{served.base_url}/v1/completions", content=body)
        assert "content-type" not in request.headers
        with httpx.Client(timeout=60) as client:
            error = error_of(client.send(request), 415)
        assert error["code"] == "unsupported_media_type"
        assert "has no Content-Type header; add it" in error["message"]


def test_json_media_types_with_parameters_are_read_as_json(served: Served) -> None:
    body = b'{"prompt": "Hello", "max_tokens": 2}'
    for content_type in ("application/json; charset=utf-8", "application/vnd.api+json"):
        response = post(
            served, "/v1/completions", content=body, headers={"content-type": content_type}
        )
        assert response.status_code == 200, response.text
        assert response.json()["usage"]["completion_tokens"] == 2


@pytest.mark.parametrize(
    ("raw", "code", "said"),
    [
        (b"", "missing_body", "request body is empty"),
        (b"[]", "body_not_object", "got a list"),
        (b'"Hello"', "body_not_object", "got a string"),
        (b"null", "body_not_object", "got null"),
    ],
)
def test_a_json_body_that_is_not_an_object_is_422_saying_what_it_is(
    served: Served, raw: bytes, code: str, said: str
) -> None:
    for path in ("/v1/completions", "/v1/chat/completions", "/generate"):
        response = post(served, path, content=raw, headers={"content-type": "application/json"})
        error = error_of(response, 422)
        assert (error["code"], error["param"]) == (code, None)
        assert said in error["message"] and "JSON object" in error["message"]
