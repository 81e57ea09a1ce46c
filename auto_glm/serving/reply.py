"""One chat choice's reply -> reasoning, content and tool calls, whole or as deltas.

The same :class:`ReplyReader` serves a streamed and a whole reply, so both agree: the
reasoning splitter runs first (when a ``reasoning_parser`` is set and the reply is not a
forced call), then the tool-call parser reads what is left. A call gets its index and id
(``call_<random>``) when it is parsed; ``parallel_tool_calls: false`` keeps the first.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field, replace

from auto_glm.engine.outputs import RequestOutput
from auto_glm.sampling_params import SamplingParams
from auto_glm.serving.protocol import ChatCompletionRequest
from auto_glm.serving.reasoning import REASONING_MARKERS, ReasoningSplitter
from auto_glm.serving.responses import OutputFunction, OutputMessage, OutputToolCall
from auto_glm.serving.tools.base import ParsedCall, ToolCallParser
from auto_glm.serving.tools.choice import NO_TOOLS, ToolPlan, plan_tools
from auto_glm.serving.tools.registry import pick_parser

__all__ = [
    "PLAIN_REPLY",
    "CallEntry",
    "ReplyDelta",
    "ReplyPlan",
    "ReplyReader",
    "cut_short",
    "delta_fields",
    "output_message",
    "plan_reply",
]


@dataclass(frozen=True)
class CallEntry:
    index: int  # position among the reply's calls
    id: str
    call: ParsedCall


@dataclass
class ReplyDelta:
    reasoning: str = ""
    content: str = ""
    calls: list[CallEntry] = field(default_factory=list)

    def add(self, other: ReplyDelta) -> ReplyDelta:
        return ReplyDelta(
            self.reasoning + other.reasoning, self.content + other.content, self.calls + other.calls
        )


@dataclass(frozen=True)
class ReplyPlan:
    """What each choice's reader is made from."""

    tools: ToolPlan
    reasoning: str = "none"  # the reasoning_parser setting
    # the readers need markers that the tokenizer makes special tokens: decode keeping them
    keep_special_tokens: bool = False

    def reader(self) -> ReplyReader:
        plan = self.tools
        splitter = None
        if self.reasoning != "none" and plan.structured_output is None:
            splitter = ReasoningSplitter(self.reasoning)
        parser = plan.parser(plan.tools) if plan.parser is not None and plan.tools else None
        return ReplyReader(splitter, parser, plan.max_calls)

    def constrain(self, params: SamplingParams) -> SamplingParams:
        """``params`` with the JSON schema of a forced call, when there is one, and with
        special tokens kept in the text when the readers need some of them."""
        if self.keep_special_tokens:
            params = replace(params, skip_special_tokens=False)
        if self.tools.structured_output is None:
            return params
        return replace(params, structured_output=self.tools.structured_output)


def plan_reply(
    body: ChatCompletionRequest, client, tool_call_parser: str, reasoning_parser: str
) -> ReplyPlan:
    """How ``body``'s replies are read on the engine ``client`` under the server's
    ``tool_call_parser`` and ``reasoning_parser`` settings; raises APIError 400 for a
    ``tool_choice`` that does not fit ``tools``."""
    loaded = getattr(client, "loaded", None)  # a remote engine has no local model
    architectures = getattr(getattr(loaded, "hf_config", None), "architectures", None) or []
    template = getattr(client.tokenizer, "chat_template", None)
    parser = pick_parser(tool_call_parser, template, architectures)
    tools = plan_tools(body, parser)
    markers: tuple[str, ...] = ()
    if tools.parser is not None and tools.structured_output is None:
        markers += tools.parser.markers
    if reasoning_parser != "none" and tools.structured_output is None:
        markers += REASONING_MARKERS
    return ReplyPlan(tools, reasoning_parser, _any_special(client.tokenizer, markers))


def _any_special(tokenizer, markers: tuple[str, ...]) -> bool:
    """Whether decoding with skip_special_tokens would drop one of ``markers``."""
    if not markers:
        return False
    decoder = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    special = {token.content for token in decoder.values() if token.special}
    return bool(special.intersection(markers))


PLAIN_REPLY = ReplyPlan(NO_TOOLS)  # no tools, no reasoning split: the reply is content


class ReplyReader:
    def __init__(
        self,
        splitter: ReasoningSplitter | None,
        parser: ToolCallParser | None,
        max_calls: int | None,
    ) -> None:
        self.splitter = splitter
        self.parser = parser
        self.max_calls = max_calls
        self.num_calls = 0
        # blank space the content began with, held until text or a call shows whether it
        # is content (a reply of calls has none: "\n\n<tool_call>..." streamed it)
        self._blank: str | None = ""

    def _read(self, reasoning: str, content: str, final: bool, cut: bool = False) -> ReplyDelta:
        if self.parser is None:
            return ReplyDelta(reasoning, content)
        out = self.parser.feed(content)
        if final:
            out.add(self.parser.finish(cut))
        delta = ReplyDelta(reasoning, self._unblank(out.content, bool(out.calls), final))
        for call in out.calls:
            if self.max_calls is not None and self.num_calls >= self.max_calls:
                break
            delta.calls.append(CallEntry(self.num_calls, f"call_{secrets.token_hex(12)}", call))
            self.num_calls += 1
        return delta

    def _unblank(self, content: str, calls: bool, final: bool) -> str:
        """``content``, holding back the reply's leading blank space until it is followed
        by text (given with it), by a call or by the end without one (dropped)."""
        if self._blank is None:
            return content
        if content.strip():
            content, self._blank = self._blank + content, None
            return content
        self._blank += content
        if calls or self.num_calls:
            self._blank = None  # as a whole reply of calls and blank space: no content
            return ""
        if final:
            content, self._blank = self._blank, None
            return content
        return ""

    def feed(self, text: str) -> ReplyDelta:
        """The next piece of the reply."""
        if self.splitter is None:
            return self._read("", text, final=False)
        return self._read(*self.splitter.feed(text), final=False)

    def finish(self, cut: bool = False) -> ReplyDelta:
        """The reply ended (``cut``: by max_tokens or a stop string, see :func:`cut_short`):
        what was held back."""
        reasoning, content = self.splitter.finish() if self.splitter else ("", "")
        return self._read(reasoning, content, final=True, cut=cut)

    def read(self, text: str, cut: bool = False) -> ReplyDelta:
        """A whole reply at once."""
        return self.feed(text).add(self.finish(cut))

    def finish_reason(self, reason: str | None) -> str | None:
        """``tool_calls`` once calls were made, else the engine's reason."""
        return "tool_calls" if reason is not None and self.num_calls else reason


def cut_short(output: RequestOutput) -> bool:
    """Whether a finished reply was cut: by ``max_tokens`` or by a stop string (whose text
    is left out), so that an unclosed call in it is incomplete, not a call."""
    return output.outputs.finish_reason == "length" or isinstance(output.outputs.stop_reason, str)


def output_message(delta: ReplyDelta) -> OutputMessage:
    """The whole reply as the response's message; content is null when it is only calls."""
    content: str | None = delta.content
    if delta.calls and not delta.content.strip():
        content = None
    calls = [
        OutputToolCall(
            id=e.id, function=OutputFunction(name=e.call.name, arguments=e.call.arguments)
        )
        for e in delta.calls
    ]
    return OutputMessage(
        content=content, reasoning_content=delta.reasoning or None, tool_calls=calls or None
    )


def delta_fields(delta: ReplyDelta) -> list[dict]:
    """A streamed piece as chunk deltas: the text first, then per call one delta with its
    index, id and name, and one with its arguments."""
    text = {}
    if delta.reasoning:
        text["reasoning_content"] = delta.reasoning
    if delta.content:
        text["content"] = delta.content
    out = [text] if text else []
    for e in delta.calls:
        name = {"name": e.call.name, "arguments": ""}
        out.append(
            {"tool_calls": [{"index": e.index, "id": e.id, "type": "function", "function": name}]}
        )
        out.append(
            {"tool_calls": [{"index": e.index, "function": {"arguments": e.call.arguments}}]}
        )
    return out
