"""Response bodies of the HTTP API, shaped as OpenAI clients parse them."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field

__all__ = [
    "ChatChoice",
    "ChatChunk",
    "ChatChunkChoice",
    "ChatCompletionResponse",
    "ChatLogprobs",
    "ChatTokenLogprob",
    "CompletionChoice",
    "CompletionLogprobs",
    "CompletionResponse",
    "ErrorBody",
    "ErrorResponse",
    "GenerateResponse",
    "HealthResponse",
    "ModelCard",
    "ModelList",
    "OutputFunction",
    "OutputMessage",
    "OutputToolCall",
    "PromptTokensDetails",
    "TopLogprob",
    "Usage",
]

FinishReason = Literal["stop", "length", "tool_calls"]


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorBody


class PromptTokensDetails(BaseModel):
    cached_tokens: int = 0


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails | None = None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int]


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    content: list[ChatTokenLogprob]


class CompletionLogprobs(BaseModel):
    tokens: list[str] = Field(default_factory=list)
    token_logprobs: list[float] = Field(default_factory=list)
    top_logprobs: list[dict[str, float]] = Field(default_factory=list)
    text_offset: list[int] = Field(default_factory=list)


class OutputFunction(BaseModel):
    name: str
    arguments: str = Field(description="The arguments as JSON text")


class OutputToolCall(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: OutputFunction


class OutputMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None = Field(description="Null when the reply is only tool calls")
    reasoning_content: str | None = Field(
        None, description="The reply's reasoning, when a reasoning_parser is set"
    )
    tool_calls: list[OutputToolCall] | None = None


class ChatChoice(BaseModel):
    index: int
    message: OutputMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: FinishReason


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class ChatChunkChoice(BaseModel):
    index: int
    # only the keys that changed: {"role": ...} first, then content, reasoning_content or
    # tool_calls (each call's index, id and name first, then its arguments)
    delta: dict[str, Any]
    logprobs: ChatLogprobs | None = None
    finish_reason: FinishReason | None = None


class ChatChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: FinishReason | None = None


class CompletionResponse(BaseModel):
    """Both the full response and (with ``finish_reason`` None until the end) a stream chunk."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class VersionCard(BaseModel):
    version: str
    state: str = Field(description="ready, loading, unloaded (idle past keep_alive) or failed")
    weight: float = Field(description="Share of the model's requests it gets")


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "autoglm"
    max_model_len: int | None = Field(
        description="Context length; null while the model is not loaded"
    )
    version: str = Field(description="The stable version: the one with most of the traffic")
    state: str = Field(description="State of the stable version")
    versions: list[VersionCard]


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class GenerateResponse(BaseModel):
    result: str
    finish_reason: FinishReason
    usage: Usage


class HealthResponse(BaseModel):
    status: str
