"""OpenAI-compatible endpoints: ``/v1/chat/completions``, ``/v1/completions``, ``/v1/models``
(and ``/v1/models/{model}``)."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request, Response
from starlette.responses import StreamingResponse

from auto_glm.observability.exchange import exchange_of
from auto_glm.serving.errors import ERROR_RESPONSES
from auto_glm.serving.frontend import Frontend
from auto_glm.serving.openai_format import chat_logprobs, completion_logprobs, usage
from auto_glm.serving.openai_stream import chat_events, completion_events, event_stream
from auto_glm.serving.protocol import ChatCompletionRequest, CompletionRequest
from auto_glm.serving.reply import cut_short, output_message
from auto_glm.serving.responses import (
    ChatChoice,
    ChatCompletionResponse,
    CompletionChoice,
    CompletionResponse,
    ModelCard,
    ModelList,
)
from auto_glm.serving.state import caller, collect, get_state, not_served
from auto_glm.tenants import Tenant

__all__ = ["router"]

router = APIRouter(prefix="/v1", tags=["OpenAI"])
_STREAMED = {
    200: {
        "content": {"text/event-stream": {}},
        "description": "JSON, or server-sent events when `stream` is true",
    }
}


@router.get("/models", response_model=ModelList)
async def list_models(request: Request, _: Tenant | None = Depends(caller)) -> ModelList:
    """Every served model, with the state of the version that gets most of its traffic
    (``ready``, ``loading``, ``unloaded`` after ``keep_alive``, ``failed``)."""
    return ModelList(data=Frontend(get_state(request)).models())


@router.get("/models/{model:path}", response_model=ModelCard, responses=ERROR_RESPONSES)
async def retrieve_model(
    model: str, request: Request, _: Tenant | None = Depends(caller)
) -> ModelCard:
    """One served model, as :func:`list_models` shows it; 404 for a model not served."""
    cards = {card.id: card for card in Frontend(get_state(request)).models()}
    if model not in cards:
        raise not_served(model, cards)
    return cards[model]


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
    call = await Frontend(get_state(request)).chat(body, tenant, exchange_of(request))
    generation, spec, headers = call.generation, call.spec, call.metadata
    if body.stream:
        return event_stream(chat_events(generation, spec), generation, headers)
    response.headers.update(headers)
    outputs = await collect(generation, request)
    choices = []
    for i, o in enumerate(outputs):
        reader = spec.reply.reader()
        choices.append(
            ChatChoice(
                index=i,
                message=output_message(reader.read(o.outputs.text, cut_short(o))),
                finish_reason=reader.finish_reason(o.outputs.finish_reason),
                logprobs=chat_logprobs(spec.tokenizer, o, len(o.outputs.token_ids))
                if spec.logprobs is not None
                else None,
            )
        )
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
    call = await Frontend(get_state(request)).complete(body, tenant, exchange_of(request))
    generation, spec, headers = call.generation, call.spec, call.metadata
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
