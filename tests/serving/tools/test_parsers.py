"""Tool-call parsers: whole replies, the same replies in every chunking, malformed output
left as content, and the parser ``auto`` picks."""

from __future__ import annotations

import json
import random

import pytest

from auto_glm.serving.tools import PARSERS, ParsedCall, ParserOutput, pick_parser
from auto_glm.serving.tools.choice import ForcedCallParser

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
            },
        },
    },
    {"type": "function", "function": {"name": "get_time"}},
]
WEATHER = ParsedCall("get_weather", '{"city": "Paris", "days": 3}')
TIME = ParsedCall("get_time", "{}")
GLM45_WEATHER = (
    "<tool_call>get_weather\n<arg_key>city</arg_key>\n<arg_value>Paris</arg_value>\n"
    "<arg_key>days</arg_key>\n<arg_value>3</arg_value>\n</tool_call>"
)
HERMES_WEATHER = (
    '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "days": 3}}\n</tool_call>'
)

# (parser, reply, expected content, expected calls)
CASES = [
    ("glm4", 'get_weather\n{"city": "Paris", "days": 3}', "", [WEATHER]),
    (
        "glm4",
        'get_weather\n{"city": "Paris", "days": 3}<|assistant|>get_time\n{}',
        "",
        [WEATHER, TIME],
    ),
    ("glm4", "The weather is fine.", "The weather is fine.", []),
    ("glm4", "get_weather is a tool I have.", "get_weather is a tool I have.", []),
    ("glm4", 'get_weather\n{"city": "Par', 'get_weather\n{"city": "Par', []),  # cut short
    ("glm4", 'unknown_tool\n{"a": 1}', 'unknown_tool\n{"a": 1}', []),
    ("glm45", GLM45_WEATHER, "", [WEATHER]),
    ("glm45", "Let me check." + GLM45_WEATHER, "Let me check.", [WEATHER]),
    (
        "glm45",
        GLM45_WEATHER + "\n<tool_call>get_time\n</tool_call>",
        "",
        [WEATHER, TIME],
    ),
    (
        "glm45",  # GLM-4.7: no newlines; a string-typed value stays text even if it is JSON
        "<tool_call>get_weather<arg_key>city</arg_key><arg_value>42</arg_value></tool_call>",
        "",
        [ParsedCall("get_weather", '{"city": "42"}')],
    ),
    (
        "glm45",
        "<tool_call>get_weather\nno arguments here</tool_call>",
        "<tool_call>get_weather\nno arguments here</tool_call>",
        [],
    ),
    ("glm45", "a < b and <tool_ca", "a < b and <tool_ca", []),
    ("hermes", HERMES_WEATHER, "", [WEATHER]),
    ("hermes", "Sure.\n" + HERMES_WEATHER + "\n" + HERMES_WEATHER, "Sure.\n", [WEATHER, WEATHER]),
    (
        "hermes",
        '<tool_call>{"name": "get_weather", "arguments": {"city": ',
        '<tool_call>{"name": "get_weather", "arguments": {"city": ',
        [],
    ),
    ("hermes", '<tool_call>{"name": "get_time", "arguments": {}}', "", [TIME]),  # unclosed, whole
    (
        "hermes",
        '<tool_call>{"name": "rm_rf", "arguments": {}}</tool_call> done',
        '<tool_call>{"name": "rm_rf", "arguments": {}}</tool_call> done',
        [],
    ),
    ("hermes", "no calls at all", "no calls at all", []),
    (
        "llama3",
        '{"name": "get_weather", "parameters": {"city": "Paris", "days": 3}}',
        "",
        [WEATHER],
    ),
    (
        "llama3",
        '<|python_tag|>{"name": "get_time", "parameters": {}}; '
        '{"name": "get_weather", "arguments": {"city": "Paris", "days": 3}}',
        "",
        [TIME, WEATHER],
    ),
    ("llama3", "{not json at all}", "{not json at all}", []),
    # arguments that are not strict JSON (NaN, 1e999 read as Infinity) are no call
    (
        "hermes",
        '<tool_call>{"name": "get_weather", "arguments": {"days": NaN}}</tool_call>',
        '<tool_call>{"name": "get_weather", "arguments": {"days": NaN}}</tool_call>',
        [],
    ),
    (
        "llama3",
        '{"name": "get_weather", "parameters": {"days": 1e999}}',
        '{"name": "get_weather", "parameters": {"days": 1e999}}',
        [],
    ),
    # the name line may end in blank space, also while it is streamed
    ("glm4", 'get_weather \r\n{"city": "Paris", "days": 3}', "", [WEATHER]),
    ("llama3", "Hello {world}", "Hello {world}", []),
    (
        "llama3",
        '{"name": "get_time", "parameters": {}} trailing words',
        '{"name": "get_time", "parameters": {}} trailing words',
        [],
    ),
]


def _chunks(text: str, rng: random.Random) -> list[str]:
    cuts = sorted(rng.sample(range(1, len(text)), min(len(text) - 1, rng.randint(0, 12))))
    return [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)], strict=True)]


def _streamed(name: str, text: str, chunks: list[str]) -> ParserOutput:
    parser = PARSERS[name](TOOLS)
    out = ParserOutput()
    for piece in chunks:
        out.add(parser.feed(piece))
    return out.add(parser.finish())


@pytest.mark.parametrize(("name", "reply", "content", "calls"), CASES)
def test_whole_reply(name: str, reply: str, content: str, calls: list[ParsedCall]) -> None:
    out = PARSERS[name](TOOLS).parse(reply)
    assert (out.content, out.calls) == (content, calls)


@pytest.mark.parametrize(("name", "reply", "content", "calls"), CASES)
def test_any_chunking_gives_the_same_result(
    name: str, reply: str, content: str, calls: list[ParsedCall]
) -> None:
    rng = random.Random(reply)
    for chunks in [list(reply), *(_chunks(reply, rng) for _ in range(30))]:
        out = _streamed(name, reply, chunks)
        assert (out.content, out.calls) == (content, calls), chunks


def test_text_before_a_call_streams_and_a_possible_tag_is_held_back() -> None:
    parser = PARSERS["hermes"](TOOLS)
    assert parser.feed("It is sunny <tool").content == "It is sunny "
    assert parser.feed("_ca").content == ""
    assert parser.feed('ll>{"name": "get_time", "arguments": {}}').content == ""
    assert parser.feed("</tool_call>").calls == [TIME]
    parser = PARSERS["glm4"](TOOLS)
    assert parser.feed("get_w").content == ""  # may still be a call
    assert parser.feed("ind is strong").content == "get_wind is strong"


def test_arguments_are_json_text_of_an_object() -> None:
    [call] = PARSERS["glm45"](TOOLS).parse(GLM45_WEATHER).calls
    assert json.loads(call.arguments) == {"city": "Paris", "days": 3}


def test_forced_replies_are_read_as_calls() -> None:
    named = ForcedCallParser(TOOLS, named="get_weather")
    assert named.parse('{"city": "Paris", "days": 3}').calls == [WEATHER]
    required = ForcedCallParser(TOOLS)
    reply = (
        '[{"name": "get_time", "parameters": {}}, '
        '{"name": "get_weather", "parameters": {"city": "Paris", "days": 3}}]'
    )
    assert required.parse(reply).calls == [TIME, WEATHER]
    cut = '[{"name": "get_time", "param'  # max_tokens ended it: content, not a call
    assert ForcedCallParser(TOOLS).parse(cut) == ParserOutput(cut)


@pytest.mark.parametrize(
    ("setting", "template", "architectures", "expected"),
    [
        ("auto", "...<arg_key>{{ k }}</arg_key>...<tool_call>", [], "glm45"),
        ("auto", "<|im_start|>...<tool_call>", ["Qwen2ForCausalLM"], "hermes"),
        ("auto", "<|python_tag|>", [], "llama3"),
        ("auto", "[gMASK]<sop><|observation|>", [], "glm4"),
        ("auto", "{{ messages }}", ["Glm4MoeForCausalLM"], "glm45"),
        ("auto", "{{ messages }}", ["Glm4ForCausalLM"], "glm4"),
        ("auto", "{{ messages }}", ["Qwen3ForCausalLM"], "hermes"),
        ("auto", None, ["LlamaForCausalLM"], "llama3"),
        ("auto", "{{ messages }}", ["GPT2LMHeadModel"], None),
        ("hermes", "<|python_tag|>", ["LlamaForCausalLM"], "hermes"),
        ("none", "<tool_call>", ["Qwen2ForCausalLM"], None),
    ],
)
def test_auto_picks_by_template_then_architecture(
    setting: str, template: str | None, architectures: list[str], expected: str | None
) -> None:
    picked = pick_parser(setting, template, architectures)
    assert picked is (PARSERS[expected] if expected else None)


def test_an_unclosed_block_is_a_call_only_if_the_model_ended_the_reply() -> None:
    # max_tokens or a stop string cut it: a GLM-4.5 block cut after its name parsed as a
    # call with no arguments, and finish_reason said tool_calls
    for name, reply in (
        ("glm45", "<tool_call>get_weather\n<arg_key>city</arg_key>\n<arg_value>Paris</arg_value>"),
        ("glm45", "<tool_call>get_time"),
        ("hermes", '<tool_call>{"name": "get_time", "arguments": {}}'),
    ):
        parser = PARSERS[name](TOOLS)
        assert parser.feed(reply).add(parser.finish(cut=True)) == ParserOutput(reply)
        assert len(PARSERS[name](TOOLS).parse(reply).calls) == 1  # ended by the model


STRINGY = [
    {
        "type": "function",
        "function": {
            "name": "f",
            "parameters": {
                "$defs": {"Code": {"type": "string"}},
                "type": "object",
                "properties": {
                    "any_of": {"anyOf": [{"type": "string"}]},
                    "ref": {"$ref": "#/$defs/Code"},
                    "enum": {"enum": ["1", "2"]},
                    "nullable": {"type": ["string", "null"]},
                    "number": {"type": ["integer", "string"]},
                },
            },
        },
    }
]


def test_glm45_keeps_text_where_the_schema_admits_only_a_string() -> None:
    pairs = {"any_of": "123", "ref": "true", "enum": "1", "nullable": "12345", "number": "7"}
    body = "".join(f"<arg_key>{k}</arg_key><arg_value>{v}</arg_value>" for k, v in pairs.items())
    [call] = PARSERS["glm45"](STRINGY).parse(f"<tool_call>f{body}</tool_call>").calls
    assert json.loads(call.arguments) == {
        "any_of": "123",
        "ref": "true",
        "enum": "1",
        "nullable": "12345",
        "number": 7,  # an integer is admitted: read as JSON
    }
