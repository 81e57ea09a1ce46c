"""Between the gRPC messages and the front end: requests into the API's request models
(validated by the same rules, with the same messages, as REST bodies), engine updates into
streamed responses."""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError

from auto_glm.engine.outputs import RequestOutput
from auto_glm.rpc.decoding import decoded
from auto_glm.rpc.v1 import inference_pb2 as pb
from auto_glm.serving.errors import validation_error
from auto_glm.serving.openai_format import usage
from auto_glm.serving.openai_stream import StreamSpec
from auto_glm.serving.protocol import ChatCompletionRequest, CompletionRequest
from auto_glm.serving.reply import ReplyReader, cut_short
from auto_glm.serving.responses import ModelCard

__all__ = [
    "ChatReading",
    "chat_body",
    "completion_body",
    "model_list",
    "response_fields",
    "usage_message",
]

_OPTIONAL = (
    "max_tokens",
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "seed",
    "presence_penalty",
    "frequency_penalty",
    "repetition_penalty",
    "n",
)


def _sampling(options: pb.SamplingOptions) -> dict[str, Any]:
    found: dict[str, Any] = {
        name: getattr(options, name) for name in _OPTIONAL if options.HasField(name)
    }
    if options.stop:
        found["stop"] = list(options.stop)
    if options.ignore_eos:
        found["ignore_eos"] = True
    if options.user:
        found["user"] = options.user
    if options.priority:
        found["priority"] = options.priority
    return found


# REST fields that a gRPC request spells otherwise, for the param and message of its errors
_GRPC_NAMES = {
    **{name: f"sampling.{name}" for name in (*_OPTIONAL, "stop", "ignore_eos", "user")},
    "priority": "sampling.priority",
    "logprobs": "sampling.logprobs",
    "top_logprobs": "sampling.logprobs",
}


def _validated(model: type, data: dict[str, Any], names: dict[str, str] | None = None):
    """``data`` as ``model``, or its validation error naming the gRPC request's fields."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        renamed = {**_GRPC_NAMES, **(names or {})}
        errors = [
            {**e, "loc": (renamed.get(str(e["loc"][0]), e["loc"][0]), *e["loc"][1:])}
            if e["loc"]
            else e
            for e in exc.errors()
        ]
        raise validation_error(errors) from None


def completion_body(request: pb.GenerateRequest) -> CompletionRequest:
    """``Generate`` as a streamed ``/v1/completions`` body (400/422 with REST's messages)."""
    request = decoded(request)
    data = _sampling(request.sampling)
    if request.sampling.HasField("logprobs"):
        data["logprobs"] = request.sampling.logprobs
    source = request.WhichOneof("input")
    if source == "prompt":
        data["prompt"] = request.prompt
    elif source == "prompt_token_ids":
        data["prompt"] = list(request.prompt_token_ids.ids)
    if request.model:
        data["model"] = request.model
    names = {"prompt": "prompt_token_ids.ids"} if source == "prompt_token_ids" else None
    return _validated(CompletionRequest, {**data, "stream": True}, names)


def chat_body(request: pb.ChatRequest) -> ChatCompletionRequest:
    """``Chat`` as a streamed ``/v1/chat/completions`` body; ``logprobs`` N asks for the
    tokens' log probabilities with N alternatives each."""
    request = decoded(request)
    data = _sampling(request.sampling)
    if request.sampling.HasField("logprobs"):
        data["logprobs"] = True
        data["top_logprobs"] = request.sampling.logprobs
    data["messages"] = [
        {"role": m.role, "content": m.content, **({"name": m.name} if m.name else {})}
        for m in request.messages
    ]
    if request.model:
        data["model"] = request.model
    return _validated(ChatCompletionRequest, {**data, "stream": True})


def _logprobs(spec: StreamSpec, output: RequestOutput, count: int) -> list[pb.TokenLogprob]:
    if spec.logprobs is None or count == 0:
        return []
    tokenizer = spec.tokenizer
    entries = []
    ids = output.outputs.token_ids[-count:]
    for token_id, entry in zip(ids, output.outputs.logprobs[-count:], strict=True):
        logprob, top = entry if entry is not None else (0.0, [])
        entries.append(
            pb.TokenLogprob(
                token_id=token_id,
                token=tokenizer.decode([token_id], skip_special_tokens=False),
                logprob=logprob,
                top=[
                    pb.TopLogprob(
                        token_id=i,
                        token=tokenizer.decode([i], skip_special_tokens=False),
                        logprob=lp,
                    )
                    for i, lp in top
                ],
            )
        )
    return entries


def response_fields(
    spec: StreamSpec, version: str, index: int, output: RequestOutput
) -> dict[str, Any]:
    """The fields of one streamed response (Generate or Chat) for one engine update."""
    delta = output.outputs.delta_token_ids
    return {
        "id": spec.call_id,
        "model": spec.model,
        "version": version,
        "index": index,
        "text": output.outputs.delta_text,
        "token_ids": delta,
        "logprobs": _logprobs(spec, output, len(delta)),
        "finish_reason": output.outputs.finish_reason or "",
    }


class ChatReading:
    """Chat's responses: each choice's text read as the REST reply is, so that with a
    ``reasoning_parser`` the reasoning goes to ``reasoning``, out of ``text``."""

    def __init__(self, spec: StreamSpec) -> None:
        self.spec = spec
        self.readers: dict[int, ReplyReader] = {}

    def __call__(self, version: str, index: int, output: RequestOutput) -> dict[str, Any]:
        fields = response_fields(self.spec, version, index, output)
        reader = self.readers.get(index)
        if reader is None:
            reader = self.readers[index] = self.spec.reply.reader()
        read = reader.feed(output.outputs.delta_text)
        if output.finished:
            read = read.add(reader.finish(cut_short(output)))
        fields["text"], fields["reasoning"] = read.content, read.reasoning
        return fields


def usage_message(outputs: list[RequestOutput], n: int) -> pb.Usage:
    counted = usage(outputs, n)
    details = counted.prompt_tokens_details
    return pb.Usage(
        prompt_tokens=counted.prompt_tokens,
        completion_tokens=counted.completion_tokens,
        total_tokens=counted.total_tokens,
        cached_tokens=details.cached_tokens if details else 0,
    )


def model_list(cards: list[ModelCard]) -> pb.ListModelsResponse:
    return pb.ListModelsResponse(
        models=[
            pb.Model(
                id=card.id,
                version=card.version,
                state=card.state,
                max_model_len=card.max_model_len or 0,
                versions=[
                    pb.ModelVersion(version=v.version, state=v.state, weight=v.weight)
                    for v in card.versions
                ],
            )
            for card in cards
        ]
    )
