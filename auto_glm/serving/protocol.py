"""Request bodies of the HTTP API (OpenAI's shapes plus our extensions), as pydantic models.

The schema is the first line of validation: wrong types, unknown fields and out-of-range
values are rejected with 422 naming the field before any handler runs (see diagnose.py for
the precise messages of union-typed fields; text that is not valid Unicode is a 400).
Unknown fields are refused rather than ignored, so a parameter this server does not
implement (``tools``, ``logit_bias``) is an explicit error instead of a silently different
answer.
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
)

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
    "GenerateRequest",
    "MAX_MODEL_NAME",
    "MAX_N",
    "MAX_STOP",
    "SamplingFields",
    "StreamOptions",
    "TextPart",
]

MAX_N = 16  # choices per request: each is a full engine request, so keep one call bounded
MAX_STOP = 16
MAX_MODEL_NAME = 256
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
    """Decoding parameters shared by chat and text completions."""

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
    repetition_penalty: float = Field(1.0, gt=0, le=10, description="1 disables it")
    ignore_eos: bool = Field(False, description="Keep generating past end-of-sequence tokens")
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


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_call_id: str | None = None

    @field_validator("content", mode="wrap")
    @classmethod
    def _content(cls, value: Any, handler: ValidatorFunctionWrapHandler) -> Any:
        return _diagnosed(value, handler, diagnose_content)

    @property
    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(
        None, ge=1, description="Preferred over max_tokens when both are given"
    )
    logprobs: bool = Field(False, description="Return the log probability of each output token")
    top_logprobs: int | None = Field(
        None, ge=0, le=20, description="Most likely alternatives per token (needs logprobs)"
    )


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
