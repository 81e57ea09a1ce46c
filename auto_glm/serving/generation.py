"""The engine requests of one API call (``n`` choices x prompts), merged into one stream.

Outputs of every choice arrive on one asyncio queue, tagged with the choice index. The
request timeout and a shutdown are delivered through the same queue as exceptions, so a
consumer waiting for the next token wakes up for them without polling. ``close`` aborts
whatever has not finished, which frees its KV blocks; it is safe to call more than once.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable

from auto_glm.engine.client import EngineClient
from auto_glm.engine.outputs import RequestOutput
from auto_glm.engine.request import Request, RequestStatus
from auto_glm.sampling_params import SamplingParams
from auto_glm.serving.errors import APIError, to_api_error

__all__ = ["Generation"]

_Item = tuple[int, RequestOutput] | BaseException
# read from the event loop while the engine thread moves requests on: a stale read only
# shifts one admission decision by a step
_QUEUED = (RequestStatus.WAITING, RequestStatus.PREEMPTED)


class Generation:
    def __init__(
        self,
        client: EngineClient,
        request_id: str,
        timeout: float,
        on_close: Callable[[Generation], None],
        tags: dict | None = None,
    ) -> None:
        self.client = client
        self.tags = tags or {}
        self.request_id = request_id
        self.requests: list[Request] = []
        self._loop = asyncio.get_running_loop()
        self._queue: asyncio.Queue[_Item] = asyncio.Queue()
        self._unfinished: set[int] = set()
        self._on_close = on_close
        self._closed = False
        expired = APIError(
            504,
            f"request {request_id} did not finish within request_timeout "
            f"({timeout:g} s); ask for fewer tokens or raise request_timeout",
            code="request_timeout",
        )
        self._timer = self._loop.call_later(timeout, self._queue.put_nowait, expired)

    @property
    def num_waiting(self) -> int:
        """Choices accepted but not yet given a batch slot by the engine."""
        return sum(1 for i in self._unfinished if self.requests[i].status in _QUEUED)

    def submit(self, prompt: str | list[int], params: SamplingParams) -> Request:
        """Queue one more choice; raises ValueError (bad input) before anything runs."""
        index = len(self.requests)

        def sink(item: RequestOutput | BaseException) -> None:  # runs on the output thread
            self._loop.call_soon_threadsafe(
                self._queue.put_nowait, item if isinstance(item, BaseException) else (index, item)
            )

        request = self.client.submit(
            prompt, params, sink, request_id=f"{self.request_id}-{index}", tags=self.tags
        )
        self.requests.append(request)
        self._unfinished.add(index)
        return request

    def fail(self, error: APIError) -> None:
        """End the whole call with ``error`` (e.g. the drain timeout passed)."""
        self._queue.put_nowait(error)

    async def outputs(self) -> AsyncIterator[tuple[int, RequestOutput]]:
        """Yield ``(choice index, update)`` until every choice finished; raise APIError on
        timeout, shutdown or an engine failure."""
        while self._unfinished:
            item = await self._queue.get()
            if isinstance(item, BaseException):
                raise to_api_error(item)
            index, output = item
            if output.finished:
                if output.outputs.finish_reason == "abort":  # only the server aborts requests
                    raise APIError(
                        503,
                        f"request {output.request_id} was aborted by the server",
                        code="aborted",
                    )
                self._unfinished.discard(index)
            yield index, output

    async def final(self) -> list[RequestOutput]:
        """The finished output of every choice, in choice order."""
        last: dict[int, RequestOutput] = {}
        async for index, output in self.outputs():
            last[index] = output
        return [last[i] for i in range(len(self.requests))]

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._timer.cancel()
        for index in self._unfinished:
            self.client.abort(self.requests[index].request_id)
        self._unfinished.clear()
        self._on_close(self)
