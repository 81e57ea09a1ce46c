"""Hermes / Qwen tool calls: ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``.

Qwen2.5, Qwen3 and Hermes-style templates tell the model to answer a call with one JSON
object per block; several blocks are several calls.
"""

from __future__ import annotations

import json

from auto_glm.serving.tools.base import ParsedCall, TaggedParser

__all__ = ["HermesParser"]


class HermesParser(TaggedParser):
    start = "<tool_call>"
    end = "</tool_call>"
    markers = (start, end)

    def parse_block(self, body: str) -> list[ParsedCall] | None:
        try:
            data = json.loads(body)
        except ValueError:
            return None
        if not isinstance(data, dict):
            return None
        call = self.call(data.get("name"), data.get("arguments", data.get("parameters")))
        return [call] if call else None
