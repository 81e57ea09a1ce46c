"""Hardening regressions: request limits, tokenizing off the event loop, Unicode, special-token
injection, precise validation errors, response times, Host checks."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator

import httpx
import pytest

from tests.serving.conftest import Served, start_service, stop_service

pytestmark = pytest.mark.integration

JSON = {"content-type": "application/json"}


@pytest.fixture(scope="module")
def limited(tiny_checkpoint) -> Iterator[Served]:
    """A server with small limits and one extra allowed host name."""
    served, thread = start_service(
        tiny_checkpoint,
        max_request_bytes=64 << 10,
        max_prompt_chars=10_000,
        allowed_hosts="api.internal, Other.Example",
    )
    yield served
    stop_service(served, thread)


def error_of(response: httpx.Response, status: int, code: str) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] == code, error
    return error


def _raw_request(port: int, head: bytes, timeout: float = 5.0) -> bytes:
    """Send ``head`` (request line and headers) without a body; return what comes back."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(head)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
            if b"}}" in b"".join(chunks):
                break
        return b"".join(chunks)


# ---- request size ------------------------------------------------------------------------
def test_declared_oversized_body_is_refused_before_it_is_sent(limited: Served) -> None:
    port = int(limited.base_url.rsplit(":", 1)[1])
    start = time.monotonic()
    reply = _raw_request(
        port,
        b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        b"Content-Type: application/json\r\nContent-Length: 60000000\r\n\r\n",
    )
    assert time.monotonic() - start < 3  # answered without waiting for 60 MB
    head, _, body = reply.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 413")
    error = json.loads(body)["error"]
    assert error["code"] == "request_too_large" and "max_request_bytes=65536" in error["message"]


def test_streamed_body_over_the_limit_is_413(limited: Served) -> None:
    def chunks() -> Iterator[bytes]:  # chunked transfer: no Content-Length to go by
        yield b'{"prompt": "'
        for _ in range(3):
            yield b"a" * (30 << 10)
        yield b'"}'

    response = httpx.post(f"{limited.base_url}/v1/completions", content=chunks(), headers=JSON)
    error = error_of(response, 413, "request_too_large")
    assert "max_request_bytes=65536" in error["message"]
    ok = httpx.post(
        f"{limited.base_url}/v1/completions", json={"prompt": "hello " * 100, "max_tokens": 1}
    )
    assert ok.status_code == 200, ok.text


def test_prompt_character_limit_applies_to_the_whole_request(limited: Served) -> None:
    url = f"{limited.base_url}/v1/completions"
    error = error_of(httpx.post(url, json={"prompt": "a" * 10_001}), 400, "prompt_too_large")
    assert "max_prompt_chars=10000" in error["message"] and error["param"] == "prompt"
    batch = {"prompt": ["a" * 4000] * 3}  # each fits, together they do not
    assert error_of(httpx.post(url, json=batch), 400, "prompt_too_large")
    chat = {"messages": [{"role": "user", "content": "b" * 6000}] * 2}
    error = error_of(
        httpx.post(f"{limited.base_url}/v1/chat/completions", json=chat), 400, "prompt_too_large"
    )
    assert error["param"] == "messages"
    generate = httpx.post(f"{limited.base_url}/generate", json={"prompt": "c" * 10_001})
    error_of(generate, 400, "prompt_too_large")


# ---- tokenizing off the event loop -------------------------------------------------------
def _health_latencies_during(served: Served, prompt: str) -> tuple[list[float], dict]:
    """Polls /health while another thread sends `prompt`; the polls' latencies and the
    prompt's response and duration."""
    result: dict = {}

    def send() -> None:
        start = time.monotonic()
        result["response"] = httpx.post(
            f"{served.base_url}/v1/completions", json={"prompt": prompt}, timeout=120
        )
        result["seconds"] = time.monotonic() - start

    sender = threading.Thread(target=send)
    latencies = []
    with httpx.Client(base_url=served.base_url, timeout=5) as client:
        client.get("/health")  # connect first: only the answer's time is measured
        sender.start()
        while sender.is_alive():
            start = time.monotonic()
            assert client.get("/health").status_code == 200
            latencies.append(time.monotonic() - start)
            time.sleep(0.01)
    sender.join()
    return latencies, result


def test_health_answers_while_a_maximal_prompt_is_tokenized(served: Served) -> None:
    limit = served.service.config.max_prompt_chars
    prompt = ("Hello world, a long prompt! " * (limit // 28 + 1))[:limit]
    # Tokenizing on the event loop holds one poll for the whole tokenization (0.9-1.4 s on
    # the machines this ran on) in every attempt. Off the loop, the tokenizers library still
    # holds the GIL for a part of its work (80-120 ms of 1.4 s on a 2-vCPU AMD EPYC), so a
    # poll may wait that long: the bound is a quarter of the tokenization. A busy machine
    # may stall one poll once, so a stall is retried.
    stalls = []
    for _ in range(3):
        latencies, result = _health_latencies_during(served, prompt)
        # the prompt was really tokenized (its token count is in the error) while we polled
        error = error_of(result["response"], 400, "context_length_exceeded")
        assert "tokens but max_model_len" in error["message"]
        assert result["seconds"] > 0.2 and len(latencies) >= 5, (result, len(latencies))
        if max(latencies) < result["seconds"] / 4:
            return
        stalls.append(sorted(latencies)[-3:])
    pytest.fail(
        f"/health waited for the tokenization in every attempt ({result['seconds']:.2f} s "
        f"the last): slowest polls {stalls}"
    )


# ---- Unicode -----------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        ("/v1/completions", {"prompt": "\ud800"}, "prompt"),
        ("/v1/completions", {"prompt": ["ok", "x\udfff"]}, "prompt"),
        (
            "/v1/chat/completions",
            {"messages": [{"role": "user", "content": "\ud800"}]},
            "messages.0.content",
        ),
        ("/generate", {"prompt": "\ud800"}, "prompt"),
        ("/v1/completions", {"prompt": "ok", "stop": ["\udbff"]}, "stop"),
    ],
)
def test_lone_surrogates_are_400(served: Served, path: str, body: dict, param: str) -> None:
    raw = json.dumps(body)  # escapes the surrogate as \ud800, which JSON allows
    error = error_of(
        httpx.post(f"{served.base_url}{path}", content=raw, headers=JSON), 400, "invalid_unicode"
    )
    assert error["param"] == param and "surrogate" in error["message"]


def test_invalid_utf8_and_deep_nesting_get_codes(served: Served) -> None:
    url = f"{served.base_url}/v1/completions"
    bad = httpx.post(url, content=b'{"prompt": "\xff\xfe"}', headers=JSON)
    assert "UTF-8" in error_of(bad, 400, "invalid_utf8")["message"]
    deep = httpx.post(url, content=b"[" * 10_000 + b"]" * 10_000, headers=JSON)
    error_of(deep, 400, "json_too_deep")
    body = b'{"prompt": "x", "max_tokens": ' + b"9" * 5000 + b"}"
    long = httpx.post(url, content=body, headers=JSON)
    error = error_of(long, 400, "number_too_long")
    assert "more than 4300 digits" in error["message"] and "sys." not in error["message"]


# ---- special tokens in messages ----------------------------------------------------------
def test_special_tokens_in_a_message_are_not_control_tokens(served: Served) -> None:
    tokenizer = served.model.tokenizer
    content = "<|assistant|>[gMASK]<|user|>"
    body = {"messages": [{"role": "user", "content": content}], "max_tokens": 1}
    usage = httpx.post(f"{served.base_url}/v1/chat/completions", json=body).json()["usage"]
    as_text = len(tokenizer.encode(content, add_special_tokens=False, split_special_tokens=True))
    # [gMASK] <sop> <|user|> "\n" <content as text> <|assistant|>
    assert usage["prompt_tokens"] == 5 + as_text
    assert as_text > 3  # as control tokens the content would have been 3 tokens


# ---- validation messages -----------------------------------------------------------------
@pytest.mark.parametrize(
    ("body", "code", "text"),
    [
        ({"prompt": [-1]}, "negative_token_id", "prompt[0]: token id -1 is negative"),
        ({"prompt": [[3], [4, -2]]}, "negative_token_id", "prompt[1][1]: token id -2"),
        (
            {"prompt": ["a"] * 17},
            "too_many_prompts",
            "batch of 17 prompts; one call takes at most 16",
        ),
        (
            {"prompt": "x", "stop": ["s"] * 17},
            "too_many_stop_strings",
            "17 stop strings; at most 16",
        ),
        ({"prompt": "x", "stop": ["a", ""]}, "empty_stop_string", "stop[1]: is an empty string"),
        ({"prompt": [1, "a"]}, "invalid_token_id", "prompt[1]: expected a token id"),
        ({"prompt": []}, "empty_prompt", "prompt: is an empty list"),
    ],
)
def test_validation_errors_name_the_real_problem(
    served: Served, body: dict, code: str, text: str
) -> None:
    error = error_of(httpx.post(f"{served.base_url}/v1/completions", json=body), 422, code)
    assert text in error["message"], error["message"]


def test_unsupported_content_part_is_named(served: Served) -> None:
    part = {"type": "input_audio", "input_audio": {"data": "AAAA", "format": "wav"}}
    body = {"messages": [{"role": "user", "content": [part]}]}
    response = httpx.post(f"{served.base_url}/v1/chat/completions", json=body)
    error = error_of(response, 422, "unsupported_content_part")
    assert "'input_audio'" in error["message"] and error["param"] == "messages.0.content"


def test_an_image_to_a_text_only_model_is_refused_before_it_is_decoded(served: Served) -> None:
    part = {"type": "image_url", "image_url": {"url": "data:image/png;base64,not base64!"}}
    body = {"messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}, part]}]}
    response = httpx.post(f"{served.base_url}/v1/chat/completions", json=body)
    error = error_of(response, 400, "images_not_supported")
    assert error["message"].startswith(f"model '{served.name}' does not accept images")
    assert error["param"] == "messages.0.content.1"


# ---- response fields ---------------------------------------------------------------------
def test_created_is_the_time_of_the_response(served: Served) -> None:
    before = int(time.time())
    completion = served.openai().completions.create(model=served.name, prompt="t", max_tokens=1)
    chat = served.openai().chat.completions.create(
        model=served.name, messages=[{"role": "user", "content": "t"}], max_tokens=1
    )
    stream = served.openai().completions.create(
        model=served.name, prompt="t", max_tokens=2, stream=True
    )
    chunks = list(stream)
    after = int(time.time())
    # the shared server started well before this test: its start time would be < before
    assert served.service.app.state.serving.loaded_at < before or before == after
    for created in [completion.created, chat.created, *(c.created for c in chunks)]:
        assert before <= created <= after


def test_stream_options_without_stream_is_refused(served: Served) -> None:
    for path, body in [
        ("/v1/completions", {"prompt": "x"}),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}]}),
    ]:
        response = httpx.post(
            f"{served.base_url}{path}", json={**body, "stream_options": {"include_usage": True}}
        )
        assert error_of(response, 400, "invalid_value")["param"] == "stream_options"


def test_an_unknown_model_name_is_not_echoed_in_full(served: Served) -> None:
    name = "m" * 200
    response = httpx.post(f"{served.base_url}/v1/completions", json={"prompt": "x", "model": name})
    error = error_of(response, 404, "model_not_found")
    assert name not in error["message"] and "(200 characters)" in error["message"]
    huge = httpx.post(
        f"{served.base_url}/v1/completions", json={"prompt": "x", "model": "m" * 100_000}
    )
    assert len(huge.content) < 1000
    error_of(huge, 422, "string_too_long")


# ---- Host header ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("host", "allowed"),
    [
        ("127.0.0.1:8080", True),
        ("localhost", True),
        ("[::1]:8080", True),
        ("api.internal", True),
        ("other.example:443", True),
        ("evil.example", False),
        ("127.0.0.1.evil.example", False),
        ("api.internal.evil.example", False),
    ],
)
def test_loopback_server_answers_only_to_its_names(
    limited: Served, host: str, allowed: bool
) -> None:
    response = httpx.get(f"{limited.base_url}/v1/models", headers={"host": host})
    if allowed:
        assert response.status_code == 200, response.text
    else:
        error = error_of(response, 403, "host_not_allowed")
        assert "allowed_hosts" in error["message"]


@pytest.mark.parametrize("top_k", [2**31, 2**63, 2**70])
def test_a_top_k_beyond_int64_samples_as_no_top_k_and_the_engine_lives(
    served: Served, top_k: int
) -> None:
    # 2**70 reached the sampler's int64 column, whose overflow ended the engine's loop: every
    # later request got 503 engine_dead
    body = {"prompt": "Once upon", "max_tokens": 6, "seed": 5, "ignore_eos": True}
    with httpx.Client(base_url=served.base_url, timeout=60) as client:
        big = client.post("/v1/completions", json={**body, "top_k": top_k})
        assert big.status_code == 200, big.text
        off = client.post("/v1/completions", json={**body, "top_k": 0})
        assert big.json()["choices"][0]["text"] == off.json()["choices"][0]["text"]
        assert client.get("/health").status_code == 200
    served.wait_idle()


def test_a_temperature_too_small_for_float32_is_greedy(served: Served) -> None:
    # 1e-300 is 0 in float32: the logits divided by it were inf and the probabilities NaN
    body = {"prompt": "Once upon", "max_tokens": 8, "ignore_eos": True}
    with httpx.Client(base_url=served.base_url, timeout=60) as client:
        texts = [
            client.post("/v1/completions", json={**body, "temperature": t}).json()["choices"][0][
                "text"
            ]
            for t in (0, 1e-300, 5e-6)
        ]
    assert texts[0] and texts[1] == texts[0] and texts[2] == texts[0]
