"""The streams' plain text events are written from a template split out of pydantic's own
serialisation; they must be pydantic's bytes for every text, and one line to every client."""

from __future__ import annotations

import json

import pytest

from auto_glm.serving.openai_stream import _MARK, _sse, _TextEvents
from auto_glm.serving.responses import (
    ChatChunk,
    ChatChunkChoice,
    CompletionChoice,
    CompletionResponse,
)

# every code point but the surrogates (which no decoded text holds), 4,096 to a text, then
# the characters JSON escapes one by one and alone
_CODE_POINTS = [cp for cp in range(0x110000) if not 0xD800 <= cp <= 0xDFFF]
TEXTS = ["".join(map(chr, _CODE_POINTS[i : i + 4096])) for i in range(0, len(_CODE_POINTS), 4096)]
TEXTS += [chr(cp) for cp in range(0x80)] + ["", ' "quoted" \\ back\\slash ', "\u2028\u2029"]


def _completion(model: str):
    def chunk(index: int, text: str) -> CompletionResponse:
        choice = CompletionChoice(index=index, text=text)
        return CompletionResponse(id="cmpl-1", created=17, model=model, choices=[choice])

    return chunk


def _chat(model: str):
    def chunk(index: int, text: str) -> ChatChunk:
        choice = ChatChunkChoice(index=index, delta={"content": text})
        return ChatChunk(id="chatcmpl-1", created=17, model=model, choices=[choice])

    return chunk


@pytest.mark.parametrize("build", [_completion, _chat])
def test_text_events_are_pydantics_bytes_for_every_code_point(build) -> None:
    chunk = build('tiny "model" é')
    events = _TextEvents(chunk)
    for index in (0, 3):
        for text in TEXTS:
            assert events.event(index, text) == _sse(chunk(index, text))


@pytest.mark.parametrize("model", [_MARK, f"odd{_MARK}name"])
def test_a_model_named_by_the_marker_leaves_every_event_to_pydantic(model: str) -> None:
    chunk = _completion(model)
    events = _TextEvents(chunk)
    for text in ("a", _MARK, "b\n"):
        assert events.event(0, text) == _sse(chunk(0, text))
    # only a JSON string that is the marker matches it: a name that holds it is no other
    templated = events._parts[0] is not None
    assert templated == (model != _MARK)


@pytest.mark.parametrize("build", [_completion, _chat])
def test_an_event_is_one_line_even_for_unicode_line_breaks(build) -> None:
    """str.splitlines (httpx's iter_lines) also breaks lines at U+0085, U+2028 and U+2029,
    which JSON leaves as they are: a token holding one split its event in two."""
    breaks = "a\x85b\u2028c\u2029d\n\r\x1c"
    chunk = build(f"model{breaks}")
    events = _TextEvents(chunk)
    for event in (events.event(0, breaks), _sse(chunk(0, breaks))):
        lines = event.splitlines()
        assert lines[0].startswith("data: ") and lines[1:] == [""]
        data = json.loads(lines[0].removeprefix("data: "))
        assert data["model"] == f"model{breaks}"
        choice = data["choices"][0]
        assert (choice["text"] if "text" in choice else choice["delta"]["content"]) == breaks
