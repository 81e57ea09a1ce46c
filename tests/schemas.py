"""The JSON schema the structured-output tests share: required fields of every kind (string
with bounds, integer range, enum, bounded array), no extra properties; and a request's
structured output that follows it."""

import json

from auto_glm.sampling_params import StructuredOutput

PERSON_SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "minLength": 1, "maxLength": 8},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "color": {"enum": ["red", "green", "blue"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 4}, "maxItems": 3},
    },
    "required": ["name", "age", "color", "tags"],
    "additionalProperties": False,
}

PERSON = StructuredOutput("json_schema", json.dumps(PERSON_SCHEMA))
