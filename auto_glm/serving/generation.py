"""The engine requests of one API call (``n`` choices x prompts), merged into one stream.

Outputs of every choice arrive on one asyncio queue, tagged with the choice index. The
request timeout and a shutdown are delivered through the same queue as exceptions, so a
consumer waiting for the next token wakes up for them without polling. ``close`` aborts
whatever has not finished, which frees its KV blocks; it is safe to call more than once.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, replace

from auto_glm.engine.client import EngineClient
from auto_glm.engine.inputs import EngineInput
from auto_glm.engine.outputs import RequestOutput, with_delta
from auto_glm.engine.request import Caller, Request, RequestStatus
from auto_glm.sampling_params import SamplingParams
from auto_glm.serving.errors import APIError, to_api_error
from auto_glm.tenants import Tenant
from auto_glm.tenants.quotas import Reservation

__all__ = ["CallUsage", "Generation"]

_Item = tuple[int, RequestOutput] | BaseException
# read from the event loop while the engine thread moves requests on: a stale read only
# shifts one admission decision by a step
_QUEUED = (RequestStatus.WAITING, RequestStatus.PREEMPTED)


@dataclass(frozen=True)
class CallUsage:
    """What one call used, counted as its response's ``usage`` is: each prompt once."""

    prompt_tokens: int
    cached_tokens: int
    completion_tokens: int
    failed: bool


class _Merged:
    """One streamed choice's updates, merged until ``interval`` new tokens are held: the
    first update goes at once (the time to the first token is unchanged), and so does the
    last. A merged update is the latest one with the held deltas' text and ids before its
    own; its cumulative fields are the latest's already."""

    __slots__ = ("_held", "_ids", "_sent", "_texts", "interval")

    def __init__(self, interval: int) -> None:
        self.interval = interval
        self._sent = False
        self._held: RequestOutput | None = None  # the latest update held back
        self._texts: list[str] = []
        self._ids: list[int] = []

    def add(self, update: RequestOutput) -> RequestOutput | None:
        """The update to send now, or None while it is held."""
        if self._held is None and (not self._sent or update.finished):
            self._sent = True
            return update
        self._held = update
        self._texts.append(update.outputs.delta_text)
        self._ids += update.outputs.delta_token_ids
        if len(self._ids) < self.interval and not update.finished:
            return None
        return self.release()

    def release(self) -> RequestOutput | None:
        """What is held, merged (None if nothing is), and nothing held any more."""
        held, self._held = self._held, None
        if held is None:
            return None
        outputs = with_delta(held.outputs, "".join(self._texts), self._ids)
        self._texts, self._ids = [], []
        return replace(held, outputs=outputs)


class Generation:
    def __init__(
        self,
        client: EngineClient,
        request_id: str,
        timeout: float,
        on_close: Callable[[Generation], None],
        caller: Caller | None = None,
        tenant: Tenant | None = None,
        priority: int = 0,
        choices_per_prompt: int = 1,
        stream: bool = True,
        stream_interval: int = 1,
    ) -> None:
        self.client = client
        self.caller = caller
        self.request_id = request_id
        self.tenant = tenant
        self.priority = priority
        self.choices_per_prompt = choices_per_prompt
        self.stream = stream  # False: only final outputs reach the event loop
        self.stream_interval = stream_interval  # tokens per update after the first
        self.requests: list[Request] = []
        self.last: dict[int, RequestOutput] = {}  # the latest output of each choice
        self.failed = False
        self.reservation: Reservation | None = None  # tokens held against the tenant's quotas
        self.target = None  # the Target (served version) the call runs on, set by Admission
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
    def num_unfinished(self) -> int:
        """Choices accepted and not finished yet."""
        return len(self._unfinished)

    @property
    def num_waiting(self) -> int:
        """Choices accepted but not yet given a batch slot by the engine."""
        return sum(1 for i in self._unfinished if self.requests[i].status in _QUEUED)

    def submit(self, prompt: str | list[int] | EngineInput, params: SamplingParams) -> Request:
        """Queue one more choice; raises ValueError (bad input) before anything runs."""
        index = len(self.requests)
        # updates merged only where streamed with an interval; otherwise each goes as it is
        merged = _Merged(self.stream_interval) if self.stream and self.stream_interval > 1 else None

        def sink(item: RequestOutput | BaseException) -> None:  # runs on the output thread
            if isinstance(item, BaseException):
                if merged is not None and (held := merged.release()) is not None:
                    self._loop.call_soon_threadsafe(self._queue.put_nowait, (index, held))
                self._loop.call_soon_threadsafe(self._queue.put_nowait, item)
            elif merged is not None:
                if (update := merged.add(item)) is not None:
                    self._loop.call_soon_threadsafe(self._queue.put_nowait, (index, update))
            elif self.stream or item.finished:  # a whole reply needs only the last update
                self._loop.call_soon_threadsafe(self._queue.put_nowait, (index, item))

        tenant = self.tenant
        request = self.client.submit(
            prompt,
            params,
            sink,
            request_id=f"{self.request_id}-{index}",
            priority=self.priority,
            # the prefix cache is shared only within a tenant; no request field can pick it
            cache_salt=None if tenant is None else f"tenant:{tenant.name}",
            caller=self.caller,
            tenant=None if tenant is None else tenant.name,
            weight=1.0 if tenant is None else tenant.limits.weight,
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
                self.failed = True
                raise to_api_error(item)
            index, output = item
            self.last[index] = output
            if output.finished:
                if output.outputs.finish_reason == "abort":  # only the server aborts requests
                    self.failed = True
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

    def usage(self) -> CallUsage:
        """Tokens used so far; the first choice of each prompt carries the prompt's count
        (the prompt's other choices share it)."""
        prompt = cached = completion = 0
        for index, request in enumerate(self.requests):
            output = self.last.get(index)
            if index % self.choices_per_prompt == 0:
                prompt += request.num_prompt_tokens
                cached += request.num_cached_tokens
            if output is not None:
                completion += len(output.outputs.token_ids)
            else:  # unfinished and not streamed: what the engine generated for it
                completion += request.num_output_tokens
        return CallUsage(prompt, cached, completion, self.failed)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._timer.cancel()
        # closed before every choice finished (disconnect, timeout, bad input): not a success
        self.failed = self.failed or bool(self._unfinished)
        for index in self._unfinished:
            self.client.abort(self.requests[index].request_id)
        self._unfinished.clear()
        self._on_close(self)
