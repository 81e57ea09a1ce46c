"""The tool-calling fields of a request message, as the chat template's turn receives them.

An assistant turn's tool calls carry their arguments as a dict, as Hugging Face templates
expect (they render ``arguments | tojson`` or iterate over its items); a tool turn keeps
its ``tool_call_id`` and ``name``; an assistant turn's earlier ``reasoning_content`` goes
along for templates that render it.
"""

from __future__ import annotations

import json

from auto_glm.serving.errors import APIError
from auto_glm.serving.protocol import ChatMessage, ToolCall

__all__ = ["tool_fields"]


def _arguments(call: ToolCall, where: str) -> dict:
    try:
        arguments = json.loads(call.function.arguments or "{}")
        json.dumps(arguments, allow_nan=False)  # strict JSON: no NaN or Infinity
    except ValueError:
        arguments = None
    if not isinstance(arguments, dict):
        raise APIError(
            400,
            f"{where}.function.arguments must be a JSON object as text, e.g. "
            '"{\\"city\\": \\"Paris\\"}"; send back the arguments the model returned',
            param=where,
            code="invalid_tool_arguments",
        )
    return arguments


def tool_fields(message: ChatMessage, index: int) -> dict:
    """The turn fields of message ``index`` beyond role and content; raises APIError 400
    for tool-call arguments that are not a JSON object."""
    fields: dict = {}
    if message.role == "assistant" and message.tool_calls:
        fields["tool_calls"] = [
            {
                "id": call.id,
                "type": "function",
                "function": {
                    "name": call.function.name,
                    "arguments": _arguments(call, f"messages[{index}].tool_calls[{j}]"),
                },
            }
            for j, call in enumerate(message.tool_calls)
        ]
    if message.role == "assistant" and message.reasoning_content is not None:
        fields["reasoning_content"] = message.reasoning_content
    if message.tool_call_id is not None:
        fields["tool_call_id"] = message.tool_call_id
    if message.name is not None:
        fields["name"] = message.name
    return fields
