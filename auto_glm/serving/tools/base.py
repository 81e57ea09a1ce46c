"""What every tool-call parser shares: the parsed call, and the two streaming shapes.

A parser is fed the reply's text as it is generated and returns, per piece, the text that
is plainly content and the calls that completed. Text that may be the start of a call is
held back until it is clear; output that looked like a call but does not parse (broken
JSON, an undeclared function) is given back as content, never dropped.

* :class:`TaggedParser`: calls sit in marked blocks (``<tool_call>...</tool_call>``) that
  may follow content and each other.
* :class:`WholeReplyParser`: the whole reply is the call(s) or it is content
  (``name\\n{...}`` of GLM-4, the JSON objects of Llama 3).
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "ParsedCall",
    "ParserOutput",
    "TaggedParser",
    "ToolCallParser",
    "WholeReplyParser",
    "partial_suffix",
]


@dataclass(frozen=True)
class ParsedCall:
    name: str
    arguments: str  # JSON text of an object


@dataclass
class ParserOutput:
    content: str = ""
    calls: list[ParsedCall] = field(default_factory=list)

    def add(self, other: ParserOutput) -> ParserOutput:
        self.content += other.content
        self.calls += other.calls
        return self


class ToolCallParser(ABC):
    """One reply's parser; ``tools`` are the request's OpenAI tool definitions."""

    # text the parser must see: kept in the reply's text even where the tokenizer makes it
    # a special token (which skip_special_tokens would drop)
    markers: tuple[str, ...] = ()

    def __init__(self, tools: Sequence[dict]) -> None:
        self.schemas: dict[str, dict] = {
            t["function"]["name"]: t["function"].get("parameters") or {} for t in tools
        }

    @abstractmethod
    def feed(self, text: str) -> ParserOutput:
        """Take the next piece of the reply."""

    @abstractmethod
    def finish(self, cut: bool = False) -> ParserOutput:
        """The reply ended (``cut``: by max_tokens or a stop string): settle what was held
        back."""

    def call(self, name: Any, arguments: Any) -> ParsedCall | None:
        """A call of a declared function with an object of arguments (strict JSON: no NaN
        or Infinity), else None."""
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments)
            except ValueError:
                return None
        if not isinstance(name, str) or name not in self.schemas:
            return None
        if not isinstance(arguments, dict):
            return None
        try:  # NaN or Infinity (1e999) would be arguments that strict JSON parsers refuse
            text = json.dumps(arguments, ensure_ascii=False, allow_nan=False)
        except ValueError:
            return None
        return ParsedCall(name, text)

    def parse(self, text: str) -> ParserOutput:
        """A whole reply at once."""
        return self.feed(text).add(self.finish())


def partial_suffix(text: str, tag: str) -> int:
    """Length of the longest end of ``text`` that is a proper beginning of ``tag``."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:n]):
            return n
    return 0


class TaggedParser(ToolCallParser):
    """Calls in ``start``...``end`` blocks; whitespace right after a call is dropped."""

    start: str
    end: str

    def __init__(self, tools: Sequence[dict]) -> None:
        super().__init__(tools)
        self._buffer = ""
        self._in_block = False
        self._after_call = False

    @abstractmethod
    def parse_block(self, body: str) -> list[ParsedCall] | None:
        """The calls of one block's text, or None when it is not a valid call."""

    def _content(self, text: str) -> str:
        if self._after_call:
            text = text.lstrip()
            self._after_call = not text
        return text

    def _block(self, body: str, closed: bool) -> ParserOutput:
        calls = self.parse_block(body)
        if calls:
            self._after_call = True
            return ParserOutput(calls=calls)
        return ParserOutput(self._content(self.start + body + (self.end if closed else "")))

    def feed(self, text: str) -> ParserOutput:
        self._buffer += text
        out = ParserOutput()
        while True:
            if self._in_block:
                pos = self._buffer.find(self.end)
                if pos < 0:
                    return out
                out.add(self._block(self._buffer[:pos], closed=True))
                self._buffer = self._buffer[pos + len(self.end) :]
                self._in_block = False
                continue
            pos = self._buffer.find(self.start)
            if pos < 0:
                keep = partial_suffix(self._buffer, self.start)
                ready = self._buffer[: len(self._buffer) - keep]
                self._buffer = self._buffer[len(ready) :]
                out.content += self._content(ready)
                return out
            out.content += self._content(self._buffer[:pos])
            self._buffer = self._buffer[pos + len(self.start) :]
            self._in_block = True

    def finish(self, cut: bool = False) -> ParserOutput:
        rest, self._buffer = self._buffer, ""
        if self._in_block:
            # an unclosed block: a call if it parses and the model ended the reply itself;
            # cut short, it may lack arguments (or a GLM-4.5 block its last pairs), so it
            # stays text
            self._in_block = False
            if cut:
                return ParserOutput(self._content(self.start + rest))
            return self._block(rest, closed=False)
        return ParserOutput(self._content(rest))


class WholeReplyParser(ToolCallParser):
    """The reply is calls from its first character, or it is content."""

    def __init__(self, tools: Sequence[dict]) -> None:
        super().__init__(tools)
        self._buffer = ""
        self._content_only = False

    @abstractmethod
    def may_start(self, text: str) -> bool:
        """Whether a reply beginning with ``text`` can still be a call."""

    @abstractmethod
    def parse_reply(self, text: str) -> list[ParsedCall] | None:
        """The calls of a whole reply, or None when it is not all calls."""

    def feed(self, text: str) -> ParserOutput:
        if self._content_only:
            return ParserOutput(text)
        self._buffer += text
        if self.may_start(self._buffer):
            return ParserOutput()
        self._content_only = True
        text, self._buffer = self._buffer, ""
        return ParserOutput(text)

    def finish(self, cut: bool = False) -> ParserOutput:
        # a reply that parses whole is complete even if cut (its JSON closed)
        text, self._buffer = self._buffer, ""
        if self._content_only or not text:
            return ParserOutput()
        calls = self.parse_reply(text)
        return ParserOutput(calls=calls) if calls else ParserOutput(text)
