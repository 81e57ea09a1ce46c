"""Llama 3.1 / 3.2 JSON tool calls: ``{"name": ..., "parameters": {...}}``.

The reply is the call, optionally after ``<|python_tag|>`` (a special token: absent from
the text unless ``skip_special_tokens`` is false); several calls are separated by ``;``.
``arguments`` is accepted in place of ``parameters``.
"""

from __future__ import annotations

import json

from auto_glm.serving.tools.base import ParsedCall, WholeReplyParser

__all__ = ["Llama3Parser"]

_TAG = "<|python_tag|>"


class Llama3Parser(WholeReplyParser):
    def may_start(self, text: str) -> bool:
        text = text.lstrip()
        return _TAG.startswith(text) or text.removeprefix(_TAG).lstrip()[:1] in ("", "{")

    def parse_reply(self, text: str) -> list[ParsedCall] | None:
        text = text.strip().removeprefix(_TAG)
        decoder, calls, pos = json.JSONDecoder(), [], 0
        while True:
            pos += len(text[pos:]) - len(text[pos:].lstrip())
            try:
                data, pos = decoder.raw_decode(text, pos)
            except ValueError:
                return None
            if not isinstance(data, dict):
                return None
            call = self.call(data.get("name"), data.get("parameters", data.get("arguments")))
            if call is None:
                return None
            calls.append(call)
            rest = text[pos:].lstrip()
            if not rest:
                return calls
            if not rest.startswith(";"):
                return None
            pos = len(text) - len(rest) + 1
