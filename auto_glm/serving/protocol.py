"""Request bodies of the HTTP API (OpenAI's shapes plus our extensions), as pydantic models.

The schema is the first line of validation: wrong types, unknown fields and out-of-range
values are rejected with 422 naming the field before any handler runs (see diagnose.py for
the precise messages of union-typed fields; text that is not valid Unicode is a 400).
Unknown fields are refused rather than ignored, so a parameter this server does not
implement (``audio``, ``prediction``) is an explicit error instead of a silently different
answer. A few fields that OpenAI clients send and that change nothing here (``store``,
``metadata``, ``service_tier``) are accepted.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidatorFunctionWrapHandler,
    field_validator,
    model_validator,
)

from auto_glm.sampling_params import LOGIT_BIAS_LIMIT, REPETITION_PENALTY_RANGE
from auto_glm.serving.diagnose import (
    check_text,
    check_unicode,
    diagnose_content,
    diagnose_prompt,
    diagnose_stop,
)

__all__ = [
    "ChatCompletionRequest",
    "ChatMessage",
    "CompletionRequest",
    "FunctionCall",
    "FunctionDefinition",
    "GenerateRequest",
    "ImagePart",
    "ImageURL",
    "JsonSchemaFormat",
    "MAX_MODEL_NAME",
    "MAX_N",
    "MAX_STOP",
    "MAX_TOOLS",
    "NamedToolChoice",
    "ResponseFormat",
    "SamplingFields",
    "StreamOptions",
    "TextPart",
    "Tool",
    "ToolCall",
]

MAX_N = 16  # choices per request: each is a full engine request, so keep one call bounded
MAX_STOP = 16
MAX_MODEL_NAME = 256
MAX_TOOLS = 128
FunctionName = Annotated[str, Field(pattern=r"^[A-Za-z0-9_.\-]{1,64}$")]
_INT64 = 2**63
TokenId = Annotated[int, Field(ge=0, strict=True)]  # strict: true and 1.0 are not ids
StopString = Annotated[str, Field(min_length=1)]
Stop = StopString | Annotated[list[StopString], Field(max_length=MAX_STOP)]
Seed = Annotated[int, Field(ge=-_INT64, lt=_INT64)]


def _diagnosed(value: Any, handler: ValidatorFunctionWrapHandler, diagnose) -> Any:
    try:
        return handler(value)
    except ValidationError:
        diagnose(value)  # raises the precise error when it finds one
        raise


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    @field_validator("*", mode="wrap")
    @classmethod
    def _valid_unicode(cls, value: Any, handler: ValidatorFunctionWrapHandler) -> Any:
        return check_unicode(_diagnosed(value, handler, check_text))


class StreamOptions(_Strict):
    include_usage: bool = Field(False, description="Send a last chunk with token usage")


class SamplingFields(_Strict):
    """Decoding parameters shared by chat and text completions. An explicit null leaves a
    parameter at its default, as OpenAI takes it (clients such as LangChain send nulls for
    what they leave unset)."""

    @model_validator(mode="before")
    @classmethod
    def _null_is_default(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        fields = cls.model_fields
        return {
            k: v
            for k, v in data.items()
            if v is not None or k not in fields or fields[k].default is None
        }

    model: str | None = Field(
        None,
        max_length=MAX_MODEL_NAME,
        description="The served model name; omitted: the first one served",
    )
    n: int = Field(1, ge=1, le=MAX_N, description="Number of choices to generate")
    stream: bool = Field(False, description="Stream server-sent events ending in [DONE]")
    stream_options: StreamOptions | None = None
    stop: Stop | None = Field(None, description="Up to 16 strings that end generation")
    seed: Seed | None = Field(None, description="Makes sampling reproducible; choice i uses seed+i")
    temperature: float = Field(1.0, ge=0, le=2, description="0 is greedy decoding")
    top_p: float = Field(1.0, gt=0, le=1)
    max_tokens: int | None = Field(None, ge=1, description="Most tokens to generate per choice")
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    user: str | None = Field(
        None,
        description="End-user id, written to the request log; keeps the user on one version "
        "when the model's traffic is sticky by user",
    )
    # extensions beyond OpenAI's parameters
    top_k: int = Field(0, ge=-1, description="Keep the k most likely tokens; 0 or -1 disables")
    min_p: float = Field(0.0, ge=0, le=1, description="Drop tokens under min_p x the top one")
    repetition_penalty: float = Field(
        1.0, ge=REPETITION_PENALTY_RANGE[0], le=10, description="1 disables it"
    )
    ignore_eos: bool = Field(False, description="Keep generating past end-of-sequence tokens")
    logit_bias: (
        dict[str, Annotated[float, Field(ge=-LOGIT_BIAS_LIMIT, le=LOGIT_BIAS_LIMIT)]] | None
    ) = Field(None, description="Token id (as a string) -> bias added to its logit, -100 to 100")
    skip_special_tokens: bool = Field(True, description="Leave special tokens out of the text")
    spaces_between_special_tokens: bool = Field(
        True, description="Put a space between special tokens in the text"
    )
    priority: int = Field(
        0,
        ge=-(2**31),
        lt=2**31,
        description="Lower runs first (with queue_policy priority); a tenant's max_priority "
        "raises smaller values to it",
    )

    @field_validator("stop", mode="wrap")
    @classmethod
    def _stop(cls, value: Any, handler: ValidatorFunctionWrapHandler) -> Any:
        return _diagnosed(value, handler, lambda v: diagnose_stop(v, MAX_STOP))


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ImageURL(_Strict):
    url: str = Field(description="A data: URL (PNG, JPEG or WebP) or an http(s) URL")
    detail: Literal["auto", "low", "high"] | None = Field(None, description="Accepted; ignored")


class ImagePart(_Strict):
    type: Literal["image_url"]
    image_url: ImageURL


ContentPart = TextPart | ImagePart


class FunctionCall(_Strict):
    name: FunctionName
    arguments: str = Field(description="The arguments as JSON text")


class ToolCall(_Strict):
    id: str = Field(max_length=256)
    type: Literal["function"] = "function"
    function: FunctionCall


class FunctionDefinition(_Strict):
    name: FunctionName
    description: str | None = None
    parameters: dict[str, Any] | None = Field(None, description="A JSON schema")
    strict: bool | None = None

    @field_validator("parameters")
    @classmethod
    def _an_object(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        # a call's arguments are an object: any other schema could never be met
        kind = (value or {}).get("type", "object")
        if kind != "object":
            raise ValueError(
                f"a function's parameters must be a JSON schema of type object, not {kind!r}; "
                "put the value in an object's property"
            )
        return value


class Tool(_Strict):
    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(_Strict):
    name: FunctionName


class NamedToolChoice(_Strict):
    type: Literal["function"]
    function: NamedFunction


class JsonSchemaFormat(_Strict):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, populate_by_name=True)

    name: str = Field(max_length=64)
    description: str | None = None
    json_schema: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None


class ResponseFormat(_Strict):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_call_id: str | None = None
    tool_calls: list[ToolCall] | None = Field(None, description="An assistant turn's calls")
    reasoning_content: str | None = Field(None, description="An assistant turn's reasoning")
    # what the openai client's message.model_dump() holds besides, sent back with the
    # history: taken when null (this server makes none of them)
    refusal: None = None
    annotations: None = None
    audio: None = None
    function_call: None = None

    @field_validator("content", mode="wrap")
    @classmethod
    def _content(cls, value: Any, handler: ValidatorFunctionWrapHandler) -> Any:
        return _diagnosed(value, handler, diagnose_content)

    @property
    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content if isinstance(part, TextPart))
        return self.content or ""

    @property
    def images(self) -> list[ImageURL]:
        if isinstance(self.content, list):
            return [part.image_url for part in self.content if isinstance(part, ImagePart)]
        return []


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(
        None, ge=1, description="Preferred over max_tokens when both are given"
    )
    logprobs: bool = Field(False, description="Return the log probability of each output token")
    top_logprobs: int | None = Field(
        None, ge=0, le=20, description="Most likely alternatives per token (needs logprobs)"
    )
    tools: Annotated[list[Tool], Field(max_length=MAX_TOOLS)] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = Field(
        None, description="Default: auto with tools, none without"
    )
    parallel_tool_calls: bool | None = Field(None, description="False: at most one call")
    response_format: ResponseFormat | None = None
    chat_template_kwargs: dict[str, Any] | None = Field(
        None, description="Passed to the chat template, e.g. {'enable_thinking': false}"
    )
    # sent by OpenAI clients; they change nothing here
    store: bool | None = None
    metadata: dict[str, str] | None = None
    service_tier: str | None = None


class CompletionRequest(SamplingFields):
    prompt: (
        str
        | Annotated[list[TokenId], Field(min_length=1)]
        | Annotated[list[str], Field(min_length=1, max_length=MAX_N)]
        | Annotated[
            list[Annotated[list[TokenId], Field(min_length=1)]],
            Field(min_length=1, max_length=MAX_N),
        ]
    ) = Field(description="Text, token ids, or a batch of either")
    logprobs: int | None = Field(
        None, ge=0, le=20, description="Return log probabilities with this many alternatives"
    )

    @field_validator("prompt", mode="wrap")
    @classmethod
    def _prompt(cls, value: Any, handler: ValidatorFunctionWrapHandler) -> Any:
        return _diagnosed(value, handler, lambda v: diagnose_prompt(v, MAX_N))


class GenerateRequest(_Strict):
    """``/generate`` and ``/infer``: the Python API's ``GLMModel.generate`` over HTTP."""

    model: str | None = Field(
        None,
        max_length=MAX_MODEL_NAME,
        description="The served model name; omitted: the first one served",
    )
    prompt: str | Annotated[list[TokenId], Field(min_length=1)]
    max_new_tokens: int = Field(128, ge=1)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(0, ge=-1)
    stop: Stop | None = None
    seed: Seed | None = None
    priority: int = Field(0, ge=-(2**31), lt=2**31, description="Lower runs first")

    @field_validator("prompt", mode="wrap")
    @classmethod
    def _prompt(cls, value: Any, handler: ValidatorFunctionWrapHandler) -> Any:
        return _diagnosed(value, handler, lambda v: diagnose_prompt(v, None))

    @field_validator("stop", mode="wrap")
    @classmethod
    def _stop(cls, value: Any, handler: ValidatorFunctionWrapHandler) -> Any:
        return _diagnosed(value, handler, lambda v: diagnose_stop(v, MAX_STOP))
