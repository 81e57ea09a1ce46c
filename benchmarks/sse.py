"""The JSON chunks of an OpenAI-style server-sent event stream, for the benchmarks' clients."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

import httpx

__all__ = ["chunks"]


async def chunks(response: httpx.Response) -> AsyncIterator[dict]:
    """Each ``data:`` chunk of ``response`` (``[DONE]`` left out); raises RuntimeError for a
    status other than 200 or an error chunk.

    Events end with a blank line; they are split on it, not on lines: random-weight text can
    hold characters (U+2028, \\x1c, ...) that str.splitlines would split an event on.
    """
    if response.status_code != 200:
        raise RuntimeError(f"HTTP {response.status_code}: {(await response.aread())[:300]!r}")
    buffer = ""
    async for piece in response.aiter_text():
        *events, buffer = (buffer + piece).split("\n\n")
        for event in events:
            data = event.removeprefix("data: ")
            if data == "[DONE]":
                continue
            chunk = json.loads(data)
            if "error" in chunk:
                raise RuntimeError(f"stream failed: {chunk['error']}")
            yield chunk
