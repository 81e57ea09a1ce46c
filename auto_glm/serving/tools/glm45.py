"""GLM-4.5 / GLM-4.6 tool calls: XML-like blocks with one key and value per argument.

``<tool_call>get_weather\\n<arg_key>city</arg_key>\\n<arg_value>Paris</arg_value>\\n
</tool_call>`` (GLM-4.7 leaves out the newlines). A value is the argument's text when the
tool's schema declares it a string, else JSON (``3``, ``true``, ``["a"]``), falling back to
the text when it is not valid JSON.
"""

from __future__ import annotations

import json
import re
from typing import Any

from auto_glm.serving.tools.base import ParsedCall, TaggedParser

__all__ = ["Glm45Parser"]

_PAIR = re.compile(r"\s*<arg_key>(.*?)</arg_key>\s*<arg_value>(.*?)</arg_value>\s*", re.DOTALL)
_NAME = re.compile(r"\s*([^\s<]+)\s*")


class Glm45Parser(TaggedParser):
    start = "<tool_call>"
    end = "</tool_call>"
    markers = (start, end, "<arg_key>", "</arg_key>", "<arg_value>", "</arg_value>")

    def _value(self, name: str, key: str, text: str) -> Any:
        properties = self.schemas.get(name, {}).get("properties") or {}
        if (properties.get(key) or {}).get("type") == "string":
            return text
        try:
            return json.loads(text)
        except ValueError:
            return text

    def parse_block(self, body: str) -> list[ParsedCall] | None:
        head = _NAME.match(body)
        if head is None:
            return None
        name, pos, arguments = head.group(1), head.end(), {}
        while pos < len(body):
            pair = _PAIR.match(body, pos)
            if pair is None:
                return None  # text that is neither a key nor a value: not a call
            arguments[pair.group(1).strip()] = self._value(
                name, pair.group(1).strip(), pair.group(2)
            )
            pos = pair.end()
        call = self.call(name, arguments)
        return [call] if call else None
