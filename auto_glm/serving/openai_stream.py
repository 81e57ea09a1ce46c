"""Server-sent event streams of chat and text completions.

Each choice first announces itself (chat: the assistant role), then sends its text deltas
(chat: content, reasoning_content and tool calls as :mod:`.reply` reads them), then a chunk
with its ``finish_reason``; ``stream_options.include_usage`` adds a last chunk
with no choices and the usage; ``data: [DONE]`` ends every stream, also one that failed
(which first gets an ``{"error": ...}`` event, as OpenAI's client expects).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass

from pydantic import BaseModel
from starlette.background import BackgroundTask
from starlette.responses import StreamingResponse

from auto_glm.engine.outputs import RequestOutput
from auto_glm.serving.errors import to_api_error
from auto_glm.serving.generation import Generation
from auto_glm.serving.openai_format import chat_logprobs, completion_logprobs, usage
from auto_glm.serving.reply import PLAIN_REPLY, ReplyPlan, delta_fields
from auto_glm.serving.responses import (
    ChatChunk,
    ChatChunkChoice,
    CompletionChoice,
    CompletionResponse,
)

__all__ = ["StreamSpec", "chat_events", "completion_events", "event_stream"]

DONE = "data: [DONE]\n\n"


@dataclass
class StreamSpec:
    """What every chunk of one streamed call repeats, and what it asked for."""

    call_id: str
    model: str
    created: int
    tokenizer: object
    n: int  # choices per prompt
    logprobs: int | None  # None: no logprobs
    include_usage: bool
    reply: ReplyPlan = PLAIN_REPLY  # chat: how each choice's reply is read


def _sse(payload: BaseModel) -> str:
    return f"data: {payload.model_dump_json()}\n\n"


def event_stream(
    events: AsyncIterator[str], generation: Generation, headers: dict[str, str]
) -> StreamingResponse:
    # The background task also runs after a disconnect cancelled the body, so the
    # generation is closed (its requests aborted) even if the body never resumes.
    return StreamingResponse(
        _framed(events, generation),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no", **headers},
        background=BackgroundTask(generation.close),
    )


async def _framed(events: AsyncIterator[str], generation: Generation) -> AsyncIterator[str]:
    try:
        async for event in events:
            yield event
    except Exception as exc:  # headers are sent: the error can only travel as an event
        yield _sse(to_api_error(exc).body())
    finally:
        generation.close()
    yield DONE


def _finish(output: RequestOutput) -> str | None:
    return output.outputs.finish_reason if output.finished else None


async def chat_events(generation: Generation, spec: StreamSpec) -> AsyncIterator[str]:
    def chunk(choices: list[ChatChunkChoice], **extra) -> str:
        return _sse(
            ChatChunk(
                id=spec.call_id, created=spec.created, model=spec.model, choices=choices, **extra
            )
        )

    readers = {}
    for index in range(len(generation.requests)):
        readers[index] = spec.reply.reader()
        yield chunk([ChatChunkChoice(index=index, delta={"role": "assistant", "content": ""})])
    last: dict[int, RequestOutput] = {}
    async for index, output in generation.outputs():
        last[index] = output
        count = len(output.outputs.delta_token_ids)
        logprobs = (
            chat_logprobs(spec.tokenizer, output, count)
            if spec.logprobs is not None and count
            else None
        )
        reader = readers[index]
        read = reader.feed(output.outputs.delta_text)
        if output.finished:
            read = read.add(reader.finish())
        deltas = delta_fields(read)
        if not (deltas or logprobs or output.finished):
            continue
        deltas = deltas or [{}]
        for i, delta in enumerate(deltas):
            final = i == len(deltas) - 1
            yield chunk(
                [
                    ChatChunkChoice(
                        index=index,
                        delta=delta,
                        logprobs=logprobs if i == 0 else None,
                        finish_reason=reader.finish_reason(_finish(output)) if final else None,
                    )
                ]
            )
    if spec.include_usage:
        yield chunk([], usage=usage([last[i] for i in sorted(last)], spec.n))


async def completion_events(generation: Generation, spec: StreamSpec) -> AsyncIterator[str]:
    last: dict[int, RequestOutput] = {}
    async for index, output in generation.outputs():
        last[index] = output
        count = len(output.outputs.delta_token_ids)
        text = output.outputs.delta_text
        logprobs = None
        if spec.logprobs is not None and count:
            start = len(output.outputs.text) - len(text)
            logprobs = completion_logprobs(spec.tokenizer, output, count, start)
        if text or logprobs or output.finished:
            choice = CompletionChoice(
                index=index, text=text, logprobs=logprobs, finish_reason=_finish(output)
            )
            yield _sse(
                CompletionResponse(
                    id=spec.call_id, created=spec.created, model=spec.model, choices=[choice]
                )
            )
    if spec.include_usage:
        yield _sse(
            CompletionResponse(
                id=spec.call_id,
                created=spec.created,
                model=spec.model,
                choices=[],
                usage=usage([last[i] for i in sorted(last)], spec.n),
            )
        )
