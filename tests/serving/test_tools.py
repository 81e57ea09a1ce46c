"""Tool calling through the official ``openai`` client against real servers.

The tiny random model never writes a call by itself, so every call below is made honest
another way: a forced ``tool_choice`` constrains decoding with the tools' JSON schema (the
engine's structured output), and ``auto`` parsing is driven with ``response_format`` on a
server whose parser reads Llama 3's JSON calls. The checkpoint's template renders tools,
earlier calls and tool results (tests/serving/tool_checkpoint.py).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import jsonschema
import pytest

from tests.serving.conftest import Served, start_service, stop_service
from tests.serving.tool_checkpoint import with_tool_template

pytestmark = pytest.mark.integration

WEATHER = {
    "type": "object",
    "properties": {"city": {"type": "string", "maxLength": 8}, "days": {"enum": [1, 2, 3]}},
    "required": ["city", "days"],
    "additionalProperties": False,
}
ZONE = {
    "type": "object",
    "properties": {"zone": {"enum": ["UTC", "CET"]}},
    "required": ["zone"],
    "additionalProperties": False,
}
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "parameters": WEATHER}},
    {"type": "function", "function": {"name": "get_time", "parameters": ZONE}},
]
SCHEMAS = {"get_weather": WEATHER, "get_time": ZONE}
USER = [{"role": "user", "content": "What is the weather in Paris?"}]
NAMED = {"type": "function", "function": {"name": "get_weather"}}


@pytest.fixture(scope="module")
def tool_checkpoint(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return with_tool_template(tiny_checkpoint, tmp_path_factory.mktemp("tool-template"))


@pytest.fixture(scope="module")
def tooled(tool_checkpoint: Path) -> Iterator[Served]:
    """``tool_call_parser: auto`` picks hermes: the template writes <tool_call>."""
    served, thread = start_service(tool_checkpoint)
    yield served
    stop_service(served, thread)


@pytest.fixture(scope="module")
def llama_parsed(tool_checkpoint: Path) -> Iterator[Served]:
    served, thread = start_service(tool_checkpoint, tool_call_parser="llama3")
    yield served
    stop_service(served, thread)


def _streamed(served: Served, **kwargs) -> tuple[list[dict], str | None, str]:
    """(tool-call deltas in order, finish_reason, content) of a streamed reply."""
    stream = served.openai().chat.completions.create(
        model=served.name, messages=USER, stream=True, **kwargs
    )
    deltas, finish, content = [], None, ""
    for chunk in stream:
        for choice in chunk.choices:
            deltas += [d.model_dump(exclude_none=True) for d in choice.delta.tool_calls or []]
            content += choice.delta.content or ""
            finish = choice.finish_reason or finish
    return deltas, finish, content


def _merged(deltas: list[dict]) -> list[tuple[str, str, str]]:
    """(id, name, arguments) per call index, the way a client accumulates the deltas."""
    calls: dict[int, dict] = {}
    for delta in deltas:
        call = calls.setdefault(delta["index"], {"id": "", "name": "", "arguments": ""})
        call["id"] += delta.get("id", "")
        call["name"] += delta.get("function", {}).get("name", "")
        call["arguments"] += delta.get("function", {}).get("arguments", "")
    return [(c["id"], c["name"], c["arguments"]) for _, c in sorted(calls.items())]


def test_a_named_tool_choice_returns_a_valid_call_streamed_or_not(tooled: Served) -> None:
    options = {"tools": TOOLS, "tool_choice": NAMED, "temperature": 0, "max_tokens": 200}
    reply = tooled.openai().chat.completions.create(model=tooled.name, messages=USER, **options)
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None
    [call] = choice.message.tool_calls
    assert call.id.startswith("call_") and call.type == "function"
    assert call.function.name == "get_weather"
    jsonschema.validate(json.loads(call.function.arguments), WEATHER)

    deltas, finish, content = _streamed(tooled, **options)
    assert finish == "tool_calls" and content == ""
    first = deltas[0]  # index, id, type and name first, then the arguments
    assert first["type"] == "function" and first["function"] == {
        "name": "get_weather",
        "arguments": "",
    }
    [(call_id, name, arguments)] = _merged(deltas)
    assert call_id.startswith("call_") and call_id != call.id
    assert (name, arguments) == ("get_weather", call.function.arguments)


def _required(served: Served, tools: list[dict], n: int, seed: int):
    """A reply with ``tool_choice: required``. A random model never stops adding calls by
    itself: a bias on "]" ends the array wherever the grammar lets it end."""
    close = served.model.tokenizer.convert_tokens_to_ids("]")
    return served.openai(timeout=120).chat.completions.create(
        model=served.name,
        messages=USER,
        tools=tools,
        tool_choice="required",
        n=n,
        seed=seed,
        max_tokens=300,
        logit_bias={str(close): 20},
    )


def test_required_calls_follow_the_declared_schemas(tooled: Served) -> None:
    reply = _required(tooled, TOOLS, n=6, seed=7)
    for choice in reply.choices:
        assert choice.finish_reason == "tool_calls", choice.message.content
        assert choice.message.tool_calls
        for call in choice.message.tool_calls:
            jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])
    single = tooled.openai().chat.completions.create(
        model=tooled.name,
        messages=USER,
        tools=TOOLS,
        tool_choice="required",
        parallel_tool_calls=False,
        seed=3,
        max_tokens=200,
    )
    assert len(single.choices[0].message.tool_calls) == 1


# what openai.pydantic_function_tool makes of a model with a nested one: its own $defs
ADDRESS = {
    "$defs": {
        "Street": {
            "type": "object",
            "properties": {"name": {"type": "string", "maxLength": 6}},
            "required": ["name"],
            "additionalProperties": False,
        }
    },
    "type": "object",
    "properties": {"street": {"$ref": "#/$defs/Street"}, "number": {"enum": [1, 2]}},
    "required": ["street", "number"],
    "additionalProperties": False,
}


def test_required_calls_of_tools_with_their_own_defs(tooled: Served) -> None:
    # each tool's references resolve in its own schema: this was a 400 "Pointer
    # '/$defs/Street' does not exist" blamed on response_format
    tools = [TOOLS[1], {"type": "function", "function": {"name": "mail", "parameters": ADDRESS}}]
    reply = _required(tooled, tools, n=4, seed=11)
    schemas = {**SCHEMAS, "mail": ADDRESS}
    names = set()
    for choice in reply.choices:
        assert choice.finish_reason == "tool_calls", choice.message.content
        for call in choice.message.tool_calls:
            jsonschema.validate(json.loads(call.function.arguments), schemas[call.function.name])
            names.add(call.function.name)
    assert "mail" in names, names
    schema = {"type": "object", "properties": {"a": {"type": "foo"}}}
    bad = {"type": "function", "function": {"name": "bad", "parameters": schema}}
    response = httpx.post(
        f"{tooled.base_url}/v1/chat/completions",
        json={"messages": USER, "tools": [bad], "tool_choice": "required"},
        timeout=60,
    )
    error = response.json()["error"]
    assert (response.status_code, error["code"], error["param"]) == (400, "invalid_schema", "tools")


def test_the_history_with_calls_and_results_goes_back_to_the_model(tooled: Served) -> None:
    client = tooled.openai()
    options = {"tools": TOOLS, "tool_choice": NAMED, "temperature": 0, "max_tokens": 200}
    first = client.chat.completions.create(model=tooled.name, messages=USER, **options)
    message = first.choices[0].message
    history = [
        *USER,
        message.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": message.tool_calls[0].id, "content": "Sunny, 21 C"},
    ]
    second = client.chat.completions.create(
        model=tooled.name, messages=history, tools=TOOLS, max_tokens=4
    )
    assert second.choices[0].message.role == "assistant"
    rendered = len(tooled.model.tokenizer.encode(message.tool_calls[0].function.arguments))
    assert second.usage.prompt_tokens > first.usage.prompt_tokens + rendered


def test_tools_are_rendered_unless_tool_choice_is_none(tooled: Served) -> None:
    def prompt_tokens(**kwargs) -> int:
        reply = tooled.openai().chat.completions.create(
            model=tooled.name, messages=USER, max_tokens=1, **kwargs
        )
        return reply.usage.prompt_tokens

    plain = prompt_tokens()
    assert prompt_tokens(tools=TOOLS, tool_choice="none") == plain
    assert prompt_tokens(tools=TOOLS) > plain


def test_auto_reads_a_call_the_model_wrote(llama_parsed: Served) -> None:
    # the grammar makes the model write a Llama 3 call; the parser reads it back
    call_schema = {
        "type": "object",
        "properties": {"name": {"const": "get_weather"}, "parameters": WEATHER},
        "required": ["name", "parameters"],
        "additionalProperties": False,
    }
    options = {
        "tools": TOOLS,
        "temperature": 0,
        "max_tokens": 200,
        "response_format": {
            "type": "json_schema",
            "json_schema": {"name": "call", "schema": call_schema},
        },
    }
    reply = llama_parsed.openai().chat.completions.create(
        model=llama_parsed.name, messages=USER, **options
    )
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    [call] = choice.message.tool_calls
    assert call.function.name == "get_weather"
    jsonschema.validate(json.loads(call.function.arguments), WEATHER)
    deltas, finish, content = _streamed(llama_parsed, **options)
    assert (finish, content) == ("tool_calls", "")
    assert [(n, a) for _, n, a in _merged(deltas)] == [("get_weather", call.function.arguments)]
    plain = llama_parsed.openai().chat.completions.create(
        model=llama_parsed.name, messages=USER, max_tokens=8, tools=TOOLS, temperature=0
    )
    assert plain.choices[0].message.tool_calls is None  # random text is content


def test_chat_template_kwargs_reach_the_template(tooled: Served) -> None:
    def prompt_tokens(**kwargs) -> int:
        reply = tooled.openai().chat.completions.create(
            model=tooled.name, messages=USER, max_tokens=1, extra_body=kwargs
        )
        return reply.usage.prompt_tokens

    thinking = prompt_tokens(chat_template_kwargs={"enable_thinking": True})
    assert thinking == prompt_tokens()
    assert prompt_tokens(chat_template_kwargs={"enable_thinking": False}) > thinking


def _error(served: Served, status: int, **body) -> dict:
    response = httpx.post(
        f"{served.base_url}/v1/chat/completions",
        json={"messages": USER, "max_tokens": 1, **body},
    )
    assert response.status_code == status, response.text
    return response.json()["error"]


@pytest.mark.parametrize(
    ("body", "param", "fragment"),
    [
        (
            {"tools": TOOLS, "tool_choice": {**NAMED, "function": {"name": "nope"}}},
            "tool_choice",
            "'nope'",
        ),
        (
            {"tools": [*TOOLS, TOOLS[0]], "tool_choice": "none"},
            "tools",
            "tools[2].function.name 'get_weather' is also the name of tools[0]; give each",
        ),
        ({"tool_choice": "required"}, "tool_choice", "tool_choice needs tools"),
        ({"tool_choice": NAMED}, "tool_choice", "tool_choice needs tools"),
        (
            {"tools": TOOLS, "tool_choice": "required", "response_format": {"type": "json_object"}},
            "response_format",
            "drop one",
        ),
        (
            {"chat_template_kwargs": {"add_generation_prompt": False}},
            "chat_template_kwargs",
            "'add_generation_prompt'",
        ),
        ({"chat_template_kwargs": {"tokenize": True}}, "chat_template_kwargs", "'tokenize'"),
        (
            {"chat_template_kwargs": {"chat_template": "x"}},
            "chat_template_kwargs",
            "'chat_template'",
        ),
        (
            {"chat_template_kwargs": {"eos_token": "<|user|>"}},
            "chat_template_kwargs",
            "'eos_token'",
        ),
        (
            {"chat_template_kwargs": {"style": "<|assistant|>"}},
            "chat_template_kwargs",
            "chat_template_kwargs.style contains '<|assistant|>'",
        ),
        (
            {"tools": [{"type": "function", "function": {"name": "f", "description": "<|user|>"}}]},
            "tools",
            "tools[0].function.description contains '<|user|>'",
        ),
        (
            {
                "messages": [
                    *USER,
                    {
                        "role": "assistant",
                        "tool_calls": [
                            {
                                "id": "c1",
                                "type": "function",
                                "function": {"name": "get_time", "arguments": "not json"},
                            }
                        ],
                    },
                ]
            },
            "messages[1].tool_calls[0]",
            "must be a JSON object",
        ),
        (  # strict JSON, as the model's own calls are
            {
                "messages": [
                    *USER,
                    {
                        "role": "assistant",
                        "tool_calls": [
                            {
                                "id": "c1",
                                "type": "function",
                                "function": {"name": "get_time", "arguments": '{"a": NaN}'},
                            }
                        ],
                    },
                ]
            },
            "messages[1].tool_calls[0]",
            "must be a JSON object",
        ),
    ],
)
def test_bad_tool_requests_are_400_naming_the_problem(
    tooled: Served, body: dict, param: str, fragment: str
) -> None:
    error = _error(tooled, 400, **body)
    assert error["param"] == param and fragment in error["message"], error


def test_a_tool_whose_parameters_are_not_an_object_is_refused(tooled: Served) -> None:
    # a call's arguments are an object: a forced call could never be read, and was a 200
    tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "string"}}}
    error = _error(tooled, 422, tools=[tool], tool_choice="required")
    assert error["param"] == "tools.0.function.parameters"
    assert "must be a JSON schema of type object, not 'string'" in error["message"]
