"""Splits a reply's ``<think>...</think>`` reasoning from its answer, as text streams in.

``glm45`` (GLM-4.5, Qwen3): the reply is reasoning only when it opens with ``<think>``;
it ends at ``</think>`` (or with the reply). ``deepseek_r1``: the template already opened
the block in the prompt, so the reply is reasoning from its start (an opening ``<think>``
is dropped) until ``</think>``. Whitespace right after ``</think>`` is dropped. Off by
default (setting ``reasoning_parser: none``): the text stays in the content, so clients
that split it themselves keep working.
"""

from __future__ import annotations

from typing import Literal

from auto_glm.serving.tools.base import partial_suffix

__all__ = ["REASONING_MARKERS", "REASONING_STYLES", "ReasoningSplitter"]

REASONING_STYLES = ("none", "glm45", "deepseek_r1")
_OPEN, _CLOSE = "<think>", "</think>"
REASONING_MARKERS = (_OPEN, _CLOSE)


class ReasoningSplitter:
    """One reply's splitter: ``feed`` and ``finish`` return ``(reasoning, content)``."""

    def __init__(self, style: Literal["glm45", "deepseek_r1"]) -> None:
        self.style = style
        self._phase = "start"  # start (undecided), reasoning, answer (content)
        self._buffer = ""
        self._strip = False  # drop whitespace at the start of the answer

    def _answer(self, text: str) -> str:
        if self._strip:
            text = text.lstrip()
            self._strip = not text
        return text

    def feed(self, text: str) -> tuple[str, str]:
        self._buffer += text
        if self._phase == "start":
            head = self._buffer.lstrip()
            if len(head) < len(_OPEN) and _OPEN.startswith(head):
                return "", ""  # may still open a block
            if head.startswith(_OPEN):
                self._buffer, self._phase = head[len(_OPEN) :], "reasoning"
            else:
                self._phase = "reasoning" if self.style == "deepseek_r1" else "answer"
        if self._phase == "answer":
            text, self._buffer = self._buffer, ""
            return "", self._answer(text)
        pos = self._buffer.find(_CLOSE)
        if pos >= 0:
            reasoning, rest = self._buffer[:pos], self._buffer[pos + len(_CLOSE) :]
            self._buffer, self._phase, self._strip = "", "answer", True
            return reasoning, self._answer(rest)
        keep = partial_suffix(self._buffer, _CLOSE)
        reasoning = self._buffer[: len(self._buffer) - keep]
        self._buffer = self._buffer[len(reasoning) :]
        return reasoning, ""

    def finish(self) -> tuple[str, str]:
        rest, self._buffer = self._buffer, ""
        if self._phase == "reasoning" or (self._phase == "start" and self.style == "deepseek_r1"):
            return rest, ""
        return "", self._answer(rest)
