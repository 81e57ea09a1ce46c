"""Server-sent event streams of chat and text completions.

Each choice first announces itself (chat: the assistant role), then sends its text deltas
(chat: content, reasoning_content and tool calls as :mod:`.reply` reads them), then a chunk
with its ``finish_reason``; ``stream_options.include_usage`` adds a last chunk
with no choices and the usage; ``data: [DONE]`` ends every stream, also one that failed
(which first gets an ``{"error": ...}`` event, as OpenAI's client expects).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from json.encoder import encode_basestring

from pydantic import BaseModel
from starlette.background import BackgroundTask
from starlette.responses import StreamingResponse

from auto_glm.engine.outputs import RequestOutput
from auto_glm.observability.exchange import Exchange
from auto_glm.serving.errors import to_api_error
from auto_glm.serving.generation import Generation
from auto_glm.serving.openai_format import chat_logprobs, completion_logprobs, usage
from auto_glm.serving.reply import PLAIN_REPLY, ReplyPlan, cut_short, delta_fields
from auto_glm.serving.responses import (
    ChatChunk,
    ChatChunkChoice,
    CompletionChoice,
    CompletionResponse,
    Usage,
)

__all__ = ["StreamSpec", "chat_events", "completion_events", "event_stream"]

DONE = "data: [DONE]\n\n"
# Characters that Python's str.splitlines takes for line breaks (and so httpx's iter_lines
# and other line readers that follow it) but JSON writes as they are: each goes out as its
# \u escape, which JSON reads back as the same character, so an event is one line to every
# client. The other breaks splitlines knows are control characters, which JSON escapes.
_LINE_BREAKS = str.maketrans({"\x85": "\\u0085", "\u2028": "\\u2028", "\u2029": "\\u2029"})


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
    return f"data: {payload.model_dump_json().translate(_LINE_BREAKS)}\n\n"


# the text's place in a template; JSON-encoded, quotes and all, it matches only a string
# that is exactly the marker (an id or a model name so named leaves the events to pydantic)
_MARK = "\x00text\x00"


class _TextEvents:
    """The events of a stream's plain text deltas, byte for byte as pydantic writes them,
    at a quarter of the cost: each choice's event is pydantic's own serialisation of a
    chunk with a marker for its text, split around the marker once, so per token only the
    text is encoded (``encode_basestring``, json's encoder without ASCII escapes, writes
    every code point as pydantic does). ``chunk(index, text)`` builds the chunk."""

    def __init__(self, chunk: Callable[[int, str], BaseModel]) -> None:
        self._chunk = chunk
        self._parts: dict[int, tuple[str, str] | None] = {}  # choice index: around the text

    def event(self, index: int, text: str) -> str:
        if index not in self._parts:
            pieces = _sse(self._chunk(index, _MARK)).split(encode_basestring(_MARK))
            self._parts[index] = (pieces[0], pieces[1]) if len(pieces) == 2 else None
        parts = self._parts[index]
        if parts is None:  # the marker was not unique: pydantic writes every event
            return _sse(self._chunk(index, text))
        return parts[0] + encode_basestring(text).translate(_LINE_BREAKS) + parts[1]


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
        error = to_api_error(exc)
        _ended(generation, error.status, error.code)
        yield _sse(error.body())
    except BaseException:  # the client left: the body was cancelled or closed
        _ended(generation, 499)
        raise
    finally:
        generation.close()
    yield DONE


def _ended(generation: Generation, status: int, code: str | None = None) -> None:
    """Tell the call's metrics and access line how its stream ended (it began as 200)."""
    if isinstance(generation.caller, Exchange):
        generation.caller.ended_status = status
        generation.caller.error_code = code


def _finish(output: RequestOutput) -> str | None:
    return output.outputs.finish_reason if output.finished else None


async def chat_events(generation: Generation, spec: StreamSpec) -> AsyncIterator[str]:
    def payload(choices: list[ChatChunkChoice], **extra) -> ChatChunk:
        return ChatChunk(
            id=spec.call_id, created=spec.created, model=spec.model, choices=choices, **extra
        )

    def chunk(choices: list[ChatChunkChoice], **extra) -> str:
        return _sse(payload(choices, **extra))

    contents = _TextEvents(
        lambda index, text: payload([ChatChunkChoice(index=index, delta={"content": text})])
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
            read = read.add(reader.finish(cut_short(output)))
        deltas = delta_fields(read)
        if not (deltas or logprobs or output.finished):
            continue
        text = deltas[0].get("content") if len(deltas) == 1 and len(deltas[0]) == 1 else None
        if text is not None and not (logprobs or output.finished):  # most of a stream's events
            yield contents.event(index, text)
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
    def payload(choices: list[CompletionChoice], total: Usage | None = None) -> CompletionResponse:
        return CompletionResponse(
            id=spec.call_id, created=spec.created, model=spec.model, choices=choices, usage=total
        )

    texts = _TextEvents(lambda index, text: payload([CompletionChoice(index=index, text=text)]))
    last: dict[int, RequestOutput] = {}
    async for index, output in generation.outputs():
        before, last[index] = last.get(index), output
        count = len(output.outputs.delta_token_ids)
        text = output.outputs.delta_text
        logprobs = None
        if spec.logprobs is not None and count:
            # the update's tokens start after all text before them: the last update's, with
            # what it held back (a possible stop string's beginning), which this delta holds
            start = len(before.outputs.text) if before is not None else 0
            logprobs = completion_logprobs(spec.tokenizer, output, count, start)
        if logprobs is None and not output.finished:
            if text:  # a plain text delta: most of a stream's events
                yield texts.event(index, text)
        else:
            choice = CompletionChoice(
                index=index, text=text, logprobs=logprobs, finish_reason=_finish(output)
            )
            yield _sse(payload([choice]))
    if spec.include_usage:
        yield _sse(payload([], usage([last[i] for i in sorted(last)], spec.n)))
