"""Between the gRPC messages and the front end: requests into the API's request models
(validated by the same rules, with the same messages, as REST bodies), engine updates into
streamed responses."""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError

from auto_glm.engine.outputs import RequestOutput
from auto_glm.rpc.v1 import inference_pb2 as pb
from auto_glm.serving.errors import validation_error
from auto_glm.serving.openai_format import usage
from auto_glm.serving.openai_stream import StreamSpec
from auto_glm.serving.protocol import ChatCompletionRequest, CompletionRequest
from auto_glm.serving.responses import ModelCard

__all__ = ["chat_body", "completion_body", "model_list", "response_fields", "usage_message"]

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


def _validated(model: type, data: dict[str, Any]):
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise validation_error(list(exc.errors())) from None


def completion_body(request: pb.GenerateRequest) -> CompletionRequest:
    """``Generate`` as a streamed ``/v1/completions`` body (400/422 with REST's messages)."""
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
    return _validated(CompletionRequest, {**data, "stream": True})


def chat_body(request: pb.ChatRequest) -> ChatCompletionRequest:
    """``Chat`` as a streamed ``/v1/chat/completions`` body; ``logprobs`` N asks for the
    tokens' log probabilities with N alternatives each."""
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
