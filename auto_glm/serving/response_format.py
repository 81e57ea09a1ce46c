"""``response_format`` and ``logit_bias`` from the OpenAI wire format to engine parameters.

The wire's ``logit_bias`` keys are token ids written as strings; ``response_format`` becomes
a :class:`StructuredOutput` (``text``: none). The engine checks the rest when the request
is submitted (an id outside the vocabulary, a schema it cannot enforce: 400s too).
"""

from __future__ import annotations

import json

from auto_glm.sampling_params import StructuredOutput
from auto_glm.serving.errors import APIError, clip
from auto_glm.serving.protocol import ResponseFormat

__all__ = ["logit_bias", "structured_output"]


def logit_bias(bias: dict[str, float] | None) -> dict[int, float] | None:
    """Token id -> bias; 400 naming a key that is not a token id."""
    if not bias:
        return None
    for key in bias:
        if not (key.isascii() and key.isdigit()):
            raise APIError(
                400,
                f"logit_bias key {clip(key, 40)!r} is not a token id; key the biases by token "
                'ids written as strings, e.g. {"1234": -100}',
                param="logit_bias",
                code="invalid_logit_bias",
            )
    return {int(key): value for key, value in bias.items()}


def structured_output(response_format: ResponseFormat | None) -> StructuredOutput | None:
    """The grammar a chat reply must follow; 400 for ``json_schema`` without a schema."""
    if response_format is None or response_format.type == "text":
        return None
    if response_format.type == "json_object":
        return StructuredOutput("json_object")
    spec = response_format.json_schema
    if spec is None or spec.json_schema is None:
        raise APIError(
            400,
            "response_format type json_schema needs its schema: send "
            '{"type": "json_schema", "json_schema": {"name": ..., "schema": {...}}}',
            param="response_format.json_schema",
            code="missing_schema",
        )
    # compact text: equal schemas (same key order) share one compiled grammar
    return StructuredOutput("json_schema", json.dumps(spec.json_schema, separators=(",", ":")))
