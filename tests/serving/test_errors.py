"""Every failure is an OpenAI-shaped error with a consistent status code."""

from __future__ import annotations

import httpx
import openai
import pytest

from tests.serving.conftest import Served

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
    served.wait_idle()


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
