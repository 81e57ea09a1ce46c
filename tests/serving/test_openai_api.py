"""The OpenAI-compatible endpoints through the official ``openai`` client."""

from __future__ import annotations

import httpx
import pytest

from tests.serving.conftest import Served

pytestmark = pytest.mark.integration
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"}]


def test_models_lists_the_served_model(served: Served) -> None:
    models = served.openai().models.list().data
    assert [m.id for m in models] == [served.name]
    assert models[0].model_extra["max_model_len"] == served.model.engine.max_model_len


def test_one_model_is_retrieved_by_its_id(served: Served) -> None:
    client = served.openai()
    model = client.models.retrieve(served.name)
    assert (model.id, model.object) == (served.name, "model")
    assert model.model_extra["max_model_len"] == served.model.engine.max_model_len
    missing = httpx.get(f"{served.base_url}/v1/models/gpt-4o")
    error = missing.json()["error"]
    assert missing.status_code == 404 and error["code"] == "model_not_found"
    assert f"serves {served.name!r}" in error["message"]


def test_null_parameters_take_their_defaults(served: Served) -> None:
    """LangChain and LiteLLM send null for what they leave unset; OpenAI takes it as the
    default, and temperature=null (among others) was a 422."""
    nulls = {"temperature": None, "top_p": None, "n": None, "stream": None}
    nulls |= {"presence_penalty": None, "frequency_penalty": None}
    greedy = {"max_tokens": 6, "seed": 3}
    for path, body in (
        ("/v1/chat/completions", {"messages": MESSAGES, "logprobs": None}),
        ("/v1/completions", {"prompt": "Hello"}),
    ):
        url = f"{served.base_url}{path}"
        given = httpx.post(url, json={**body, **greedy, **nulls}, timeout=60)
        assert given.status_code == 200, given.text
        plain = httpx.post(url, json={**body, **greedy}, timeout=60).json()
        assert given.json()["choices"] == plain["choices"]
        tokens = ("prompt_tokens", "completion_tokens")  # (the second hits the prefix cache)
        assert [given.json()["usage"][k] for k in tokens] == [plain["usage"][k] for k in tokens]


def test_a_reply_dumped_by_the_client_goes_back_in_the_history(served: Served) -> None:
    """message.model_dump() holds refusal, annotations, audio and function_call (null):
    sending it back was a 422 'Extra inputs are not permitted'."""
    client = served.openai()
    first = client.chat.completions.create(model=served.name, messages=MESSAGES, max_tokens=4)
    dumped = first.choices[0].message.model_dump()
    assert {"refusal", "annotations", "audio", "function_call"} <= set(dumped)
    history = [*MESSAGES, dumped, {"role": "user", "content": "And then?"}]
    again = client.chat.completions.create(model=served.name, messages=history, max_tokens=4)
    assert again.choices[0].finish_reason == "length"


def test_greedy_completion_equals_python_api(served: Served) -> None:
    reply = served.openai().completions.create(
        model=served.name, prompt="The quick brown fox", max_tokens=12, temperature=0
    )
    expected = served.model.generate("The quick brown fox", max_new_tokens=12, temperature=0)
    assert reply.choices[0].text == expected
    assert reply.choices[0].finish_reason == "length"
    prompt_ids = served.model.tokenizer.encode("The quick brown fox")
    assert reply.usage.prompt_tokens == len(prompt_ids)
    assert reply.usage.completion_tokens == 12
    assert reply.usage.total_tokens == len(prompt_ids) + 12


def test_greedy_chat_equals_python_api(served: Served) -> None:
    reply = served.openai().chat.completions.create(
        model=served.name, messages=MESSAGES, max_tokens=10, temperature=0
    )
    assert reply.choices[0].message.role == "assistant"
    assert reply.choices[0].message.content == served.model.chat(
        MESSAGES, max_new_tokens=10, temperature=0
    )
    assert reply.usage.completion_tokens == 10


def test_native_generate_and_infer_equal_python_api(served: Served) -> None:
    expected = served.model.generate("Once upon", max_new_tokens=8, temperature=0)
    for path in ("/generate", "/infer"):
        body = {"prompt": "Once upon", "max_new_tokens": 8, "temperature": 0}
        body = httpx.post(f"{served.base_url}{path}", json=body).json()
        assert body["result"] == expected
        assert body["finish_reason"] == "length"
        assert body["usage"]["completion_tokens"] == 8


def test_streamed_completion_concatenates_to_the_full_text(served: Served) -> None:
    client = served.openai()
    full = (
        client.completions.create(model=served.name, prompt="Hello", max_tokens=16, temperature=0)
        .choices[0]
        .text
    )
    chunks = list(
        client.completions.create(
            model=served.name,
            prompt="Hello",
            max_tokens=16,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert "".join(c.choices[0].text for c in chunks if c.choices) == full
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert not chunks[-1].choices and chunks[-1].usage.completion_tokens == 16


def test_streamed_chat_with_n_choices_and_usage(served: Served) -> None:
    stream = served.openai().chat.completions.create(
        model=served.name,
        messages=MESSAGES,
        max_tokens=6,
        n=3,
        seed=11,
        stream=True,
        stream_options={"include_usage": True},
    )
    texts, finish, roles, usage = {}, {}, {}, None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            roles.setdefault(choice.index, choice.delta.role)
            texts[choice.index] = texts.get(choice.index, "") + (choice.delta.content or "")
            if choice.finish_reason:
                finish[choice.index] = choice.finish_reason
    assert roles == {0: "assistant", 1: "assistant", 2: "assistant"}
    assert finish == {0: "length", 1: "length", 2: "length"}
    # the prompt is the chat template's rendering, counted once for the call (not per choice)
    prompt_ids = served.model.tokenizer.apply_chat_template(
        MESSAGES, tokenize=True, add_generation_prompt=True
    )
    if not isinstance(prompt_ids, list):  # newer transformers return a BatchEncoding
        prompt_ids = prompt_ids["input_ids"]
    assert usage.prompt_tokens == len(prompt_ids) > 0
    assert usage.completion_tokens == 18
    assert usage.total_tokens == len(prompt_ids) + 18
    # the same call without streaming gives the same choices (seed + i per choice)
    reply = served.openai().chat.completions.create(
        model=served.name, messages=MESSAGES, max_tokens=6, n=3, seed=11
    )
    assert {c.index: c.message.content for c in reply.choices} == texts
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens) == (len(prompt_ids), 18)


def test_seed_makes_sampling_reproducible_and_choices_differ(served: Served) -> None:
    client = served.openai()

    def sample(seed: int) -> list[str]:
        reply = client.completions.create(
            model=served.name, prompt="Seeds", max_tokens=12, temperature=1.0, n=2, seed=seed
        )
        return [c.text for c in sorted(reply.choices, key=lambda c: c.index)]

    first = sample(1234)
    assert sample(1234) == first
    assert first[0] != first[1]
    assert sample(99) != first


def test_stop_string_ends_the_choice(served: Served) -> None:
    client = served.openai()
    full = (
        client.completions.create(
            model=served.name, prompt="Stop here", max_tokens=24, temperature=0
        )
        .choices[0]
        .text
    )
    stop = full[len(full) // 2 : len(full) // 2 + 2]
    index = full.index(stop)
    for stream in (False, True):
        reply = client.completions.create(
            model=served.name,
            prompt="Stop here",
            max_tokens=24,
            temperature=0,
            stop=[stop],
            stream=stream,
        )
        if stream:
            chunks = [c.choices[0] for c in reply if c.choices]
            text, reason = "".join(c.text for c in chunks), chunks[-1].finish_reason
        else:
            text, reason = reply.choices[0].text, reply.choices[0].finish_reason
        assert (text, reason) == (full[:index], "stop")


def test_chat_logprobs(served: Served) -> None:
    reply = served.openai().chat.completions.create(
        model=served.name,
        messages=MESSAGES,
        max_completion_tokens=5,
        temperature=0,
        logprobs=True,
        top_logprobs=3,
    )
    content = reply.choices[0].logprobs.content
    assert len(content) == reply.usage.completion_tokens == 5
    for entry in content:
        assert entry.logprob <= 0 and len(entry.top_logprobs) == 3
        # greedy: the chosen token is the most likely one
        assert entry.logprob == pytest.approx(entry.top_logprobs[0].logprob, abs=1e-5)
        if "\ufffd" not in entry.token:  # else a part of a character: see the next test
            assert bytes(entry.bytes).decode() == entry.token


def test_chat_logprob_bytes_join_characters_split_across_tokens(served: Served) -> None:
    # the reply is held to one string; the tokenizer has no token for the emoji's four
    # UTF-8 bytes, so each is a token alone, whose decoded text is U+FFFD
    text = "你好🎉"
    schema = {"type": "string", "enum": [text]}
    reply = served.openai().chat.completions.create(
        model=served.name,
        messages=MESSAGES,
        max_completion_tokens=16,
        logprobs=True,
        top_logprobs=2,
        response_format={"type": "json_schema", "json_schema": {"name": "s", "schema": schema}},
    )
    choice = reply.choices[0]
    assert choice.message.content == f'"{text}"'
    content = choice.logprobs.content
    assert sum(entry.token == "\ufffd" for entry in content) >= 4
    assert b"".join(bytes(entry.bytes) for entry in content).decode() == f'"{text}"'
    for top in (t for entry in content for t in entry.top_logprobs):
        if "\ufffd" not in top.token:  # a whole token's bytes are its text's
            assert bytes(top.bytes).decode() == top.token


def test_completion_logprobs_and_token_id_prompts(served: Served) -> None:
    ids = served.model.tokenizer.encode("Token ids work")
    client = served.openai()
    reply = client.completions.create(
        model=served.name, prompt=[ids, ids[:-1]], max_tokens=4, temperature=0, logprobs=2
    )
    as_text = client.completions.create(
        model=served.name, prompt="Token ids work", max_tokens=4, temperature=0
    )
    assert [c.index for c in reply.choices] == [0, 1]
    assert reply.choices[0].text == as_text.choices[0].text
    logprobs = reply.choices[0].logprobs
    assert len(logprobs.tokens) == len(logprobs.token_logprobs) == 4
    assert all(len(top) <= 2 for top in logprobs.top_logprobs)
    assert reply.usage.prompt_tokens == 2 * len(ids) - 1


def test_extensions_are_accepted(served: Served) -> None:
    reply = served.openai().completions.create(
        model=served.name,
        prompt="Extensions",
        max_tokens=8,
        temperature=0.8,
        top_p=0.9,
        presence_penalty=0.5,
        frequency_penalty=0.5,
        user="tester",
        seed=3,
        extra_body={"top_k": 20, "min_p": 0.05, "repetition_penalty": 1.1, "ignore_eos": True},
    )
    assert reply.usage.completion_tokens == 8


def _text(served: Served, max_tokens: int = 8, **options) -> str:
    extra = {k: options.pop(k) for k in ("top_k", "min_p", "repetition_penalty") if k in options}
    reply = served.openai().completions.create(
        model=served.name,
        prompt="Extensions",
        max_tokens=max_tokens,
        extra_body={"ignore_eos": True, **extra},
        **options,
    )
    return reply.choices[0].text


@pytest.mark.parametrize(
    ("name", "greedy_value", "mild_value"), [("top_k", 1, 20), ("min_p", 1.0, 0.05)]
)
def test_top_k_and_min_p_reach_the_sampler(
    served: Served, name: str, greedy_value: float, mild_value: float
) -> None:
    greedy = _text(served, temperature=0)
    sampled = _text(served, temperature=1.0, seed=3)
    assert sampled != greedy  # the random model's distribution is flat: sampling wanders
    # top_k=1 and min_p=1 keep only the most likely token: sampling becomes greedy
    assert _text(served, temperature=1.0, seed=3, **{name: greedy_value}) == greedy
    # a milder value filters fewer tokens, yet still changes what the same seed draws
    assert _text(served, temperature=1.0, seed=3, **{name: mild_value}) != sampled


def test_repetition_penalty_reaches_the_sampler(served: Served) -> None:
    plain = _text(served, max_tokens=32, temperature=0)
    penalized = _text(served, max_tokens=32, temperature=0, repetition_penalty=10)
    assert penalized != plain
    # the same penalty through the Python API (straight into the engine) gives the same text
    assert penalized == served.model.generate(
        "Extensions", max_new_tokens=32, temperature=0, repetition_penalty=10, ignore_eos=True
    )


def test_probes_and_docs(served: Served) -> None:
    assert httpx.get(f"{served.base_url}/health").json() == {"status": "ok"}
    assert httpx.get(f"{served.base_url}/ready").json() == {"status": "ready"}
    assert "swagger" in httpx.get(f"{served.base_url}/docs").text.lower()
    paths = httpx.get(f"{served.base_url}/openapi.json").json()["paths"]
    assert {
        "/v1/chat/completions",
        "/v1/completions",
        "/v1/models",
        "/generate",
        "/infer",
        "/health",
        "/ready",
    } <= set(paths)
