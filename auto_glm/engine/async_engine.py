"""asyncio face of the engine, for the server: ``generate`` yields incremental outputs."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from auto_glm.engine.client import EngineClient
from auto_glm.engine.outputs import RequestOutput
from auto_glm.sampling_params import SamplingParams

__all__ = ["AsyncEngine"]


class AsyncEngine:
    def __init__(self, client: EngineClient) -> None:
        self.client = client

    async def generate(
        self,
        prompt: str | list[int],
        params: SamplingParams,
        request_id: str | None = None,
        priority: int = 0,
        cache_salt: str | None = None,
    ) -> AsyncIterator[RequestOutput]:
        """Submit a request and yield its updates until it finishes.

        Invalid input raises ValueError before anything is queued. Leaving the loop early
        (a client disconnect, cancellation, a timeout) aborts the request in the engine and
        frees its KV blocks.
        """
        loop = asyncio.get_running_loop()
        updates: asyncio.Queue[RequestOutput | BaseException] = asyncio.Queue()

        def sink(item: RequestOutput | BaseException) -> None:
            loop.call_soon_threadsafe(updates.put_nowait, item)

        request = self.client.submit(prompt, params, sink, request_id, priority, cache_salt)
        finished = False
        try:
            while not finished:
                item = await updates.get()
                if isinstance(item, BaseException):
                    finished = True
                    raise item
                finished = item.finished
                yield item
        finally:
            if not finished:
                self.client.abort(request.request_id)

    def abort(self, request_id: str) -> None:
        self.client.abort(request_id)
