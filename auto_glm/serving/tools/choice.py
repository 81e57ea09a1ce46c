"""``tool_choice`` and ``parallel_tool_calls`` -> how a chat request renders and reads calls.

* no tools, or ``"none"``: the template gets no tools and the reply is content.
* ``"auto"`` (the default with tools): the tools are rendered and the reply is parsed
  with the model's parser.
* ``"required"`` or a named function: decoding is constrained with a JSON schema so the
  reply is a call with valid arguments (an array of ``{"name", "parameters"}`` objects of
  the declared tools; for a named function, its arguments object), then read as calls.
  ``parallel_tool_calls: false`` limits the array to one call.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

from auto_glm.sampling_params import StructuredOutput
from auto_glm.serving.errors import APIError
from auto_glm.serving.protocol import ChatCompletionRequest, NamedToolChoice, Tool
from auto_glm.serving.tools.base import ParsedCall, ToolCallParser, WholeReplyParser

__all__ = ["NO_TOOLS", "ForcedCallParser", "ToolPlan", "plan_tools"]

_ANY_OBJECT = {"type": "object"}


class ForcedCallParser(WholeReplyParser):
    """Reads a reply constrained by the schema of :func:`plan_tools`; held to the end.
    ``named``: the forced function, whose arguments object is the whole reply."""

    def __init__(self, tools: Sequence[dict], named: str | None = None) -> None:
        super().__init__(tools)
        self.named = named

    def may_start(self, text: str) -> bool:
        return True

    def parse_reply(self, text: str) -> list[ParsedCall] | None:
        try:
            data = json.loads(text)
        except ValueError:
            return None  # cut short (max_tokens): left as content
        if self.named is not None:
            call = self.call(self.named, data)
            return [call] if call else None
        if not isinstance(data, list) or not all(isinstance(item, dict) for item in data):
            return None
        calls = [self.call(item.get("name"), item.get("parameters")) for item in data]
        return calls if calls and all(calls) else None


@dataclass(frozen=True)
class ToolPlan:
    tools: list[dict] | None  # what the template renders
    parser: Callable[[Sequence[dict]], ToolCallParser] | None  # None: the reply is content
    structured_output: StructuredOutput | None  # set when a call is forced
    max_calls: int | None  # parallel_tool_calls false: 1


NO_TOOLS = ToolPlan(None, None, None, None)


def _moved(schema: Any, root: str) -> Any:
    """``schema`` with its local references (``#``, ``#/$defs/...``) made to point into
    ``root``, the JSON pointer where it now sits in a larger schema."""
    if isinstance(schema, dict):
        moved = {key: _moved(value, root) for key, value in schema.items()}
        ref = schema.get("$ref")
        if isinstance(ref, str) and (ref == "#" or ref.startswith("#/")):
            moved["$ref"] = f"#{root}{ref[1:]}"
        return moved
    if isinstance(schema, list):
        return [_moved(item, root) for item in schema]
    return schema


def _schema(tools: Sequence[dict], named: str | None, max_calls: int | None) -> str:
    parameters = {
        t["function"]["name"]: t["function"].get("parameters") or _ANY_OBJECT for t in tools
    }
    if named is not None:
        return json.dumps(parameters[named], separators=(",", ":"))
    # each tool's schema sits whole under $defs, where its own references still resolve
    # (pydantic's tools refer to "#/$defs/Model" of their own schema)
    defined = {
        f"tool_{i}": _moved(schema, f"/$defs/tool_{i}")
        for i, schema in enumerate(parameters.values())
    }
    item = {
        "anyOf": [
            {
                "type": "object",
                "properties": {"name": {"const": name}, "parameters": {"$ref": f"#/$defs/{key}"}},
                "required": ["name", "parameters"],
                "additionalProperties": False,
            }
            for name, key in zip(parameters, defined, strict=True)
        ]
    }
    array = {"$defs": defined, "type": "array", "items": item, "minItems": 1}
    if max_calls is not None:
        array["maxItems"] = max_calls
    return json.dumps(array, separators=(",", ":"))


def _check_unique_names(tools: Sequence[Tool]) -> None:
    """APIError 400 where two tools share a name: a call names its tool, so it would be
    ambiguous (and a forced call's schema would drop one of them)."""
    first: dict[str, int] = {}
    for index, tool in enumerate(tools):
        name = tool.function.name
        if name in first:
            raise APIError(
                400,
                f"tools[{index}].function.name {name!r} is also the name of "
                f"tools[{first[name]}]; give each tool a unique name",
                param="tools",
                code="duplicate_tool_name",
            )
        first[name] = index


def plan_tools(body: ChatCompletionRequest, parser: type[ToolCallParser] | None) -> ToolPlan:
    """The plan of ``body``; raises APIError 400 for tools that share a name, or a
    ``tool_choice`` without tools or naming a function that is not among them."""
    choice = body.tool_choice
    if not body.tools:
        if choice not in (None, "none"):
            raise APIError(
                400,
                "tool_choice needs tools: declare the functions in tools, or drop tool_choice",
                param="tool_choice",
                code="invalid_value",
            )
        return NO_TOOLS
    _check_unique_names(body.tools)
    if choice == "none":
        return NO_TOOLS
    tools = [tool.model_dump(exclude_none=True) for tool in body.tools]
    max_calls = 1 if body.parallel_tool_calls is False else None
    if choice in (None, "auto"):
        return ToolPlan(tools, parser, None, max_calls)
    named = choice.function.name if isinstance(choice, NamedToolChoice) else None
    if named is not None and named not in {t["function"]["name"] for t in tools}:
        raise APIError(
            400,
            f"tool_choice names the function {named!r}, which is not in tools; declare it "
            "in tools or name one of them",
            param="tool_choice",
            code="invalid_value",
        )
    if body.response_format is not None and body.response_format.type != "text":
        raise APIError(
            400,
            "response_format and a forced tool_choice both constrain the reply; drop one of "
            "them (tool_choice auto works with response_format)",
            param="response_format",
            code="invalid_value",
        )
    forced = partial(ForcedCallParser, named=named)
    structured = StructuredOutput("json_schema", _schema(tools, named, max_calls))
    return ToolPlan(tools, forced, structured, max_calls)
