"""The reasoning splitter and the reply reader, whole and in every chunking."""

from __future__ import annotations

import random

import pytest

from auto_glm.serving.reasoning import ReasoningSplitter
from auto_glm.serving.reply import PLAIN_REPLY, ReplyDelta, ReplyPlan
from auto_glm.serving.tools.choice import ToolPlan
from auto_glm.serving.tools.hermes import HermesParser

CASES = [
    ("glm45", "<think>plan it</think>\n\nThe answer.", "plan it", "The answer."),
    ("glm45", "  <think>a < b</thin", "a < b</thin", ""),  # cut short: all reasoning
    ("glm45", "No thinking here <think>x</think>", "", "No thinking here <think>x</think>"),
    ("glm45", "<thin", "", "<thin"),
    ("deepseek_r1", "plan it</think>The answer.", "plan it", "The answer."),
    ("deepseek_r1", "<think>plan it</think>The answer.", "plan it", "The answer."),
    ("deepseek_r1", "still thinking", "still thinking", ""),
]


def _pieces(text: str, rng: random.Random) -> list[str]:
    cuts = sorted(rng.sample(range(1, len(text)), min(len(text) - 1, rng.randint(0, 8))))
    return [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)], strict=True)]


@pytest.mark.parametrize(("style", "reply", "reasoning", "content"), CASES)
def test_split_in_any_chunking(style: str, reply: str, reasoning: str, content: str) -> None:
    rng = random.Random(reply)
    for pieces in [[reply], list(reply), *(_pieces(reply, rng) for _ in range(30))]:
        splitter = ReasoningSplitter(style)
        parts = [splitter.feed(p) for p in pieces] + [splitter.finish()]
        assert ("".join(r for r, _ in parts), "".join(c for _, c in parts)) == (
            reasoning,
            content,
        ), pieces


def test_off_by_default_the_reply_is_all_content() -> None:
    reply = "<think>plan</think>answer"
    assert PLAIN_REPLY.reader().read(reply) == ReplyDelta(content=reply)


def test_reasoning_then_a_call_in_one_reply() -> None:
    tools = [{"type": "function", "function": {"name": "f"}}]
    plan = ReplyPlan(ToolPlan(tools, HermesParser, None, 1), "glm45")
    reply = '<think>call f</think><tool_call>{"name": "f", "arguments": {}}</tool_call>' * 2
    reader = plan.reader()
    read = reader.read(reply)
    assert read.reasoning == "call f"
    assert [(e.index, e.call.name) for e in read.calls] == [(0, "f")]  # parallel off: one
    assert read.calls[0].id.startswith("call_")
    assert reader.finish_reason("stop") == "tool_calls"


@pytest.mark.parametrize(
    ("reply", "content"),
    [
        ('\n\n<tool_call>{"name": "f", "arguments": {}}</tool_call>', ""),
        ('\n\nSure.<tool_call>{"name": "f", "arguments": {}}</tool_call>', "\n\nSure."),
        ("\n\n", "\n\n"),
        ("  \nno call", "  \nno call"),
    ],
)
def test_blank_space_before_a_call_is_no_content_streamed_or_not(reply: str, content: str) -> None:
    # streamed, the blank space before a call was a content delta; whole, content was null
    tools = [{"type": "function", "function": {"name": "f"}}]
    plan = ReplyPlan(ToolPlan(tools, HermesParser, None, None))
    assert plan.reader().read(reply).content == content
    for size in (1, 2, 3):
        reader = plan.reader()
        pieces = [reply[i : i + size] for i in range(0, len(reply), size)]
        streamed = ReplyDelta()
        for piece in pieces:
            streamed = streamed.add(reader.feed(piece))
        assert streamed.add(reader.finish()).content == content, pieces


def test_a_reply_cut_inside_a_call_is_content_and_not_a_call() -> None:
    tools = [{"type": "function", "function": {"name": "f"}}]
    plan = ReplyPlan(ToolPlan(tools, HermesParser, None, None))
    reply = 'Sure.<tool_call>{"name": "f", "arguments": {}}'  # </tool_call> never came
    reader = plan.reader()
    assert reader.read(reply, cut=True) == ReplyDelta(content=reply)
    assert reader.finish_reason("length") == "length"
    reader = plan.reader()  # the model ended the reply there itself: a call
    assert [e.call.name for e in reader.read(reply).calls] == ["f"]
    assert reader.finish_reason("stop") == "tool_calls"
