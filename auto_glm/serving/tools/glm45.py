"""GLM-4.5 / GLM-4.6 tool calls: XML-like blocks with one key and value per argument.

``<tool_call>get_weather\\n<arg_key>city</arg_key>\\n<arg_value>Paris</arg_value>\\n
</tool_call>`` (GLM-4.7 leaves out the newlines). A value is the argument's text when the
tool's schema admits only a string there (its ``type``, an ``enum`` of strings, a union of
them or a ``$ref`` to one; or a string or null), else JSON (``3``, ``true``, ``["a"]``),
falling back to the text when it is not valid JSON.
"""

from __future__ import annotations

import json
import re
from typing import Any

from auto_glm.serving.tools.base import ParsedCall, TaggedParser

__all__ = ["Glm45Parser"]

_PAIR = re.compile(r"\s*<arg_key>(.*?)</arg_key>\s*<arg_value>(.*?)</arg_value>\s*", re.DOTALL)
_NAME = re.compile(r"\s*([^\s<]+)\s*")
_MAX_DEPTH = 16  # of $ref and unions followed to find a value's type
_KINDS = {str: "string", type(None): "null"}  # an enum's values: the kinds that matter here


class Glm45Parser(TaggedParser):
    start = "<tool_call>"
    end = "</tool_call>"
    markers = (start, end, "<arg_key>", "</arg_key>", "<arg_value>", "</arg_value>")

    def _value(self, name: str, key: str, text: str) -> Any:
        root = self.schemas.get(name, {})
        properties = root.get("properties") or {}
        types = _types(properties.get(key), root)
        if types and types <= {"string", "null"} and "string" in types:
            return None if text == "null" and "null" in types else text
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


def _types(schema: Any, root: dict, depth: int = 0) -> set[str]:
    """The JSON types ``schema`` admits, as far as its ``type``, ``enum``, ``const``,
    unions and local ``$ref`` (into ``root``, the tool's parameters) tell; empty: unknown."""
    if not isinstance(schema, dict) or depth > _MAX_DEPTH:
        return set()
    ref = schema.get("$ref")
    if isinstance(ref, str) and ref.startswith("#"):
        target: Any = root
        for part in ref[1:].split("/")[1:]:
            key = part.replace("~1", "/").replace("~0", "~")
            target = target.get(key) if isinstance(target, dict) else None
        return _types(target, root, depth + 1)
    kind = schema.get("type")
    if isinstance(kind, str):
        return {kind}
    if isinstance(kind, list):
        return {k for k in kind if isinstance(k, str)}
    values = schema["enum"] if isinstance(schema.get("enum"), list) else None
    if values is None and "const" in schema:
        values = [schema["const"]]
    if values:
        return {_KINDS.get(type(v), "other") for v in values}
    for union in ("anyOf", "oneOf"):
        if isinstance(schema.get(union), list):
            found = [_types(branch, root, depth + 1) for branch in schema[union]]
            return set().union(*found) if all(found) else set()
    return set()
