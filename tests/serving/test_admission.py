"""Admission control (429 when the queue is full) and aborting on disconnect."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.serving.conftest import (
    EngineGate,
    Served,
    hang_up_streams,
    start_service,
    stop_service,
    until,
)

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def small_queue(tiny_checkpoint: Path) -> Iterator[Served]:
    served, thread = start_service(tiny_checkpoint, max_num_seqs=2, max_queued_requests=2)
    yield served
    stop_service(served, thread)


async def _call(client: httpx.AsyncClient, index: int, n: int = 1, stream: bool = False):
    """One completions call; returns (status, headers, body or the stream's choices)."""
    body = {
        "prompt": f"request {index}",
        "max_tokens": 5,
        "ignore_eos": True,
        "n": n,
        "stream": stream,
    }
    async with client.stream("POST", "/v1/completions", json=body) as response:
        raw = await response.aread()
    if response.status_code != 200 or not stream:
        return response.status_code, response.headers, json.loads(raw)
    events = [line[6:] for line in raw.decode().splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    choices: dict[int, dict] = {}
    for event in events[:-1]:
        for choice in json.loads(event)["choices"]:
            entry = choices.setdefault(choice["index"], {"text": "", "finish_reason": None})
            entry["text"] += choice["text"]
            entry["finish_reason"] = choice["finish_reason"] or entry["finish_reason"]
    return 200, response.headers, {"choices": [choices[i] for i in sorted(choices)]}


def _assert_queue_full(status: int, headers, body: dict) -> None:
    assert status == 429, body
    assert int(headers["retry-after"]) >= 1
    assert body["error"]["type"] == "rate_limit_error"
    assert body["error"]["code"] == "queue_full"


async def _refused(client: httpx.AsyncClient, index: int, n: int = 1, stream: bool = False):
    """A call that must get 429 at once; accepted, it would wait for the held engine."""
    body = {"prompt": f"refused {index}", "max_tokens": 5, "n": n, "stream": stream}
    accepted = f"call {index} (n={n}, stream={stream}) was accepted: too many choices waiting"
    try:
        async with client.stream("POST", "/v1/completions", json=body, timeout=5) as response:
            assert response.status_code != 200, accepted
            raw = await response.aread()
    except httpx.ReadTimeout:
        raise AssertionError(accepted) from None
    _assert_queue_full(response.status_code, response.headers, json.loads(raw))


def test_full_queue_gets_429_and_every_accepted_request_completes(
    small_queue: Served, monkeypatch: pytest.MonkeyPatch
) -> None:
    """max_queued_requests=2: exactly two choices may wait, whatever the calls' shapes."""
    gate = EngineGate(small_queue, monkeypatch)
    admission = small_queue.admission

    async def scenario() -> tuple[list, list]:
        async with httpx.AsyncClient(base_url=small_queue.base_url, timeout=60) as client:
            # the engine takes the first call and is then held: nothing else leaves the queue
            running = asyncio.ensure_future(_call(client, 0, stream=True))
            assert await asyncio.to_thread(gate.entered.wait, 10)
            accepted = [asyncio.ensure_future(_call(client, 1))]
            await asyncio.to_thread(until, lambda: admission.num_waiting == 1)
            # one place left: a call of n=2 does not fit, each of its choices counts
            await _refused(client, 2, n=2)
            await _refused(client, 3, n=2, stream=True)
            accepted.append(asyncio.ensure_future(_call(client, 4, stream=True)))
            await asyncio.to_thread(until, lambda: admission.num_waiting == 2)
            # exactly max_queued_requests wait now: anything more is refused at once
            await _refused(client, 5)
            await _refused(client, 6, stream=True)
            await asyncio.gather(*(_refused(client, 7 + i) for i in range(8)))
            assert admission.num_waiting == 2
            gate.release()
            return [await running, *await asyncio.gather(*accepted)]

    try:
        accepted = asyncio.run(scenario())
    finally:
        gate.release()
    for status, _, body in accepted:
        assert status == 200, body
        assert [c["finish_reason"] for c in body["choices"]] == ["length"]
    small_queue.wait_idle()


def test_a_burst_admits_exactly_the_queue_size(
    small_queue: Served, monkeypatch: pytest.MonkeyPatch
) -> None:
    """16 concurrent calls against a held engine: one runs, two wait, thirteen get 429."""
    gate = EngineGate(small_queue, monkeypatch)

    async def burst() -> list:
        async with httpx.AsyncClient(base_url=small_queue.base_url, timeout=60) as client:
            first = asyncio.ensure_future(_call(client, 0))
            assert await asyncio.to_thread(gate.entered.wait, 10)
            rest = [
                asyncio.ensure_future(_call(client, i, stream=i % 2 == 0)) for i in range(1, 16)
            ]
            # settled: thirteen refused (calls being prepared count as in flight too)
            await asyncio.to_thread(until, lambda: sum(r.done() for r in rest) == 13)
            # one running, max_queued_requests=2 waiting
            assert small_queue.admission.num_in_flight == 3
            gate.release()
            return [await first, *await asyncio.gather(*rest)]

    try:
        results = asyncio.run(burst())
    finally:
        gate.release()
    statuses = [status for status, _, _ in results]
    assert statuses.count(200) == 3 and statuses.count(429) == 13, statuses
    for status, headers, body in results:
        if status == 429:
            _assert_queue_full(status, headers, body)
        else:
            assert [c["finish_reason"] for c in body["choices"]] == ["length"]
    small_queue.wait_idle()


def test_disconnected_streams_free_their_kv_blocks(served: Served) -> None:
    reasons: list[str] = []
    served.model.engine.add_finish_listener(
        lambda request, output, error: reasons.append(request.finish_reason.value)
    )
    assert hang_up_streams(served.base_url, 50) == [3] * 50
    served.wait_idle()  # every aborted request's blocks are back: KV usage 0
    assert reasons == ["abort"] * 50  # ended by the disconnects, not by max_tokens


def test_client_leaving_a_non_streamed_request_aborts_it(served: Served) -> None:
    reasons: list[str] = []
    served.model.engine.add_finish_listener(
        lambda request, output, error: reasons.append(request.finish_reason.value)
    )
    body = {"prompt": "never read", "max_tokens": 480, "ignore_eos": True, "n": 4}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{served.base_url}/v1/completions", json=body, timeout=0.3)
    served.wait_idle()
    assert reasons == ["abort"] * 4


def test_dead_engine_turns_probes_and_requests_into_503(tiny_checkpoint: Path) -> None:
    served, thread = start_service(tiny_checkpoint)
    try:
        served.model.engine.shutdown()  # as if the loop had died: is_alive turns false
        for path in ("/health", "/ready"):
            response = httpx.get(f"{served.base_url}{path}")
            assert response.status_code == 503
            assert response.json()["error"]["code"] == "engine_dead"
        response = httpx.post(f"{served.base_url}/v1/completions", json={"prompt": "hi"})
        assert response.status_code == 503
    finally:
        stop_service(served, thread)
