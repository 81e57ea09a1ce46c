"""OpenAI-compatible endpoints: ``/v1/chat/completions``, ``/v1/completions``, ``/v1/models``."""

from __future__ import annotations

import logging
import time
import uuid

from fastapi import APIRouter, Depends, Request, Response
from starlette.responses import StreamingResponse

from auto_glm.fleet import Lease
from auto_glm.observability import request_tags
from auto_glm.serving.errors import ERROR_RESPONSES, APIError
from auto_glm.serving.openai_format import (
    chat_logprobs,
    completion_logprobs,
    sampling_params,
    usage,
)
from auto_glm.serving.openai_stream import StreamSpec, chat_events, completion_events, event_stream
from auto_glm.serving.protocol import MAX_N, ChatCompletionRequest, CompletionRequest
from auto_glm.serving.responses import (
    ChatChoice,
    ChatCompletionResponse,
    CompletionChoice,
    CompletionResponse,
    ModelCard,
    ModelList,
    OutputMessage,
    VersionCard,
)
from auto_glm.serving.state import ServingState, caller, collect, get_state, until_admitted
from auto_glm.tenants import Tenant

__all__ = ["router"]

log = logging.getLogger("auto_glm.serving")
router = APIRouter(prefix="/v1", tags=["OpenAI"])
_STREAMED = {
    200: {
        "content": {"text/event-stream": {}},
        "description": "JSON, or server-sent events when `stream` is true",
    }
}


def _spec(
    lease: Lease,
    prefix: str,
    n: int,
    logprobs: int | None,
    body: ChatCompletionRequest | CompletionRequest,
) -> StreamSpec:
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    return StreamSpec(
        f"{prefix}-{uuid.uuid4().hex}",
        lease.model,
        int(time.time()),
        lease.client.tokenizer,
        n,
        logprobs,
        include_usage,
    )


def _start(
    state: ServingState,
    lease: Lease,
    request: Request,
    call_id: str,
    work: list,
    tenant: Tenant | None,
    body: ChatCompletionRequest | CompletionRequest,
):
    return state.admission.start(
        lease,
        call_id,
        work,
        request_tags(request, len(work)),
        tenant=tenant,
        priority=state.tenancy.priority(tenant, body.priority),
        choices_per_prompt=body.n,
        stream=body.stream,
    )


def _check_stream_options(body: ChatCompletionRequest | CompletionRequest) -> None:
    if body.stream_options is not None and not body.stream:
        raise APIError(
            400,
            "stream_options is only allowed when stream is true; drop it or set stream",
            param="stream_options",
            code="invalid_value",
        )


@router.get("/models", response_model=ModelList)
async def list_models(request: Request, _: Tenant | None = Depends(caller)) -> ModelList:
    """Every served model, with the state of the version that gets most of its traffic
    (``ready``, ``loading``, ``unloaded`` after ``keep_alive``, ``failed``)."""
    state = get_state(request)
    cards = []
    for model in state.table.models.values():
        stable = model.versions[model.traffic.stable]
        engine = stable.engine
        cards.append(
            ModelCard(
                id=model.name,
                created=state.loaded_at,
                max_model_len=engine.max_model_len if engine is not None else None,
                version=stable.version,
                state=stable.state.value,
                versions=[
                    VersionCard(version=v.version, state=v.state.value, weight=model.weight(k))
                    for k, v in model.versions.items()
                ],
            )
        )
    return ModelList(data=cards)


@router.post(
    "/chat/completions",
    response_model=ChatCompletionResponse,
    responses={**ERROR_RESPONSES, **_STREAMED},
)
async def chat_completions(
    body: ChatCompletionRequest,
    request: Request,
    response: Response,
    tenant: Tenant | None = Depends(caller),
) -> ChatCompletionResponse | StreamingResponse:
    state = get_state(request)
    _check_stream_options(body)
    if body.top_logprobs and not body.logprobs:
        raise APIError(
            400, "top_logprobs needs logprobs=true", param="top_logprobs", code="invalid_value"
        )
    lease = await state.route(body.model, tenant, request, body.user)
    with until_admitted(lease):
        client = lease.client
        prompt = await state.preprocessor.chat(client, body.messages)
        # OpenAI's default for chat: as long as the context allows
        max_tokens = (
            body.max_completion_tokens
            or body.max_tokens
            or max(client.max_model_len - len(prompt), 1)
        )
        logprobs = (body.top_logprobs or 0) if body.logprobs else None
        spec = _spec(lease, "chatcmpl", body.n, logprobs, body)
        log.debug("%s: chat, user=%s, n=%d", spec.call_id, body.user, body.n)
        work = [(prompt, sampling_params(body, max_tokens, logprobs, i)) for i in range(body.n)]
        generation = _start(state, lease, request, spec.call_id, work, tenant, body)
    headers = state.headers(tenant, lease)
    if body.stream:
        return event_stream(chat_events(generation, spec), generation, headers)
    response.headers.update(headers)
    outputs = await collect(generation, request)
    choices = [
        ChatChoice(
            index=i,
            message=OutputMessage(content=o.outputs.text),
            finish_reason=o.outputs.finish_reason,
            logprobs=chat_logprobs(spec.tokenizer, o, len(o.outputs.token_ids))
            if logprobs is not None
            else None,
        )
        for i, o in enumerate(outputs)
    ]
    return ChatCompletionResponse(
        id=spec.call_id,
        created=spec.created,
        model=spec.model,
        choices=choices,
        usage=usage(outputs, body.n),
    )


@router.post(
    "/completions", response_model=CompletionResponse, responses={**ERROR_RESPONSES, **_STREAMED}
)
async def completions(
    body: CompletionRequest,
    request: Request,
    response: Response,
    tenant: Tenant | None = Depends(caller),
) -> CompletionResponse | StreamingResponse:
    state = get_state(request)
    _check_stream_options(body)
    prompts = body.prompt
    # one prompt (text or token ids) or a batch of them
    if isinstance(prompts, str) or isinstance(prompts[0], int):
        prompts = [prompts]
    if len(prompts) * body.n > MAX_N:
        raise APIError(
            400,
            f"{len(prompts)} prompts x n={body.n} asks for {len(prompts) * body.n} "
            f"choices; one call may ask for at most {MAX_N}",
            param="n",
            code="too_many_choices",
        )
    lease = await state.route(body.model, tenant, request, body.user)
    with until_admitted(lease):
        token_ids = await state.preprocessor.prompts(lease.client, prompts, "prompt")
        spec = _spec(lease, "cmpl", body.n, body.logprobs, body)
        log.debug(
            "%s: completion, user=%s, prompts=%d, n=%d",
            spec.call_id,
            body.user,
            len(prompts),
            body.n,
        )
        max_tokens = body.max_tokens or 16  # OpenAI's default for completions
        work = [
            (prompt, sampling_params(body, max_tokens, body.logprobs, i))
            for prompt in token_ids
            for i in range(body.n)
        ]
        generation = _start(state, lease, request, spec.call_id, work, tenant, body)
    headers = state.headers(tenant, lease)
    if body.stream:
        return event_stream(completion_events(generation, spec), generation, headers)
    response.headers.update(headers)
    outputs = await collect(generation, request)
    choices = [
        CompletionChoice(
            index=i,
            text=o.outputs.text,
            finish_reason=o.outputs.finish_reason,
            logprobs=completion_logprobs(spec.tokenizer, o, len(o.outputs.token_ids), 0)
            if body.logprobs is not None
            else None,
        )
        for i, o in enumerate(outputs)
    ]
    return CompletionResponse(
        id=spec.call_id,
        created=spec.created,
        model=spec.model,
        choices=choices,
        usage=usage(outputs, body.n),
    )
