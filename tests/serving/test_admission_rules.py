"""Admission rules on a fake engine client: draining, a dead engine, the server's and each
tenant's queue limits, token reservations, failures half-way and usage at the end."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path

import pytest
from opentelemetry.context import Context

from auto_glm.engine.core import EngineDeadError
from auto_glm.engine.outputs import CompletionOutput, RequestOutput
from auto_glm.engine.request import Request, RequestStatus
from auto_glm.observability.exchange import Exchange
from auto_glm.sampling_params import SamplingParams
from auto_glm.serving.admission import Admission
from auto_glm.serving.errors import APIError
from auto_glm.serving.tenancy import Tenancy
from auto_glm.tenants import Tenant, TenantLimits, TenantStore
from auto_glm.tenants.loads import Load

PARAMS = SamplingParams(max_tokens=5)


class FakeClient:
    """Takes requests without running them; a prompt [0] is invalid, [666] kills it."""

    def __init__(self) -> None:
        self.is_alive = True
        self.submitted: list[Request] = []
        self.aborted: list[str] = []
        self.sinks = {}

    def submit(self, prompt, params, sink, request_id=None, **options) -> Request:
        if prompt == [0]:
            raise ValueError("prompt token ids [0] are not allowed here")
        if prompt == [666]:
            raise EngineDeadError("the engine loop is not running; restart the server")
        request = Request(request_id, prompt, params)
        request.options = options
        self.submitted.append(request)
        self.sinks[request_id] = sink
        return request

    def finish(self, request: Request, tokens: list[int], finished: bool = True) -> None:
        """Deliver an output of the request (its last one by default), as the output thread
        would."""
        reason = "length" if finished else None
        done = CompletionOutput("", tokens, "", tokens, finish_reason=reason)
        output = RequestOutput(request.request_id, request.prompt_token_ids, done, finished)
        self.sinks[request.request_id](output)

    def abort(self, request_id: str) -> None:
        self.aborted.append(request_id)


class FakeTarget:
    """A served version as admission sees it; counts how often it was released."""

    def __init__(self, client: FakeClient, model: str = "glm") -> None:
        self.client, self.model, self.version = client, model, "v1"
        self.released = 0

    def release(self) -> None:
        self.released += 1


class FakeTenancy:
    """Records what admission reserves and books; holds no tenant to any limit (the real
    :class:`Tenancy` of the ``tenancy`` fixture does)."""

    def __init__(self) -> None:
        self.reserved: list[tuple[str | None, int]] = []
        self.finished: list[tuple[object, object]] = []

    async def reserve(self, tenant, tokens, load, choices):
        self.reserved.append((None if tenant is None else tenant.name, tokens))
        return f"reservation-{len(self.reserved)}"

    def finish(self, reservation, usage) -> None:
        self.finished.append((reservation, usage))

    def rate_headers(self, tenant) -> dict[str, str]:
        return {} if tenant is None else {"x-ratelimit-limit-requests": "60"}


@pytest.fixture
def tenancy(tmp_path: Path) -> Iterator[Tenancy]:
    """The server's own tenancy, its budgets kept in this process, on a SQLite file."""
    found = Tenancy(TenantStore(f"sqlite:///{tmp_path / 'tenants.db'}"), "off", None)
    yield found
    found.close()


def tenant(name: str, **limits) -> Tenant:
    return Tenant(name, TenantLimits(**limits), datetime(2024, 1, 1, tzinfo=timezone.utc))


async def refused(admission: Admission, target: FakeTarget, work, **options) -> APIError:
    released = target.released
    with pytest.raises(APIError) as caught:
        await admission.start(target, "call", work, **options)
    assert target.released == released + 1  # a refused call gives its target back at once
    return caught.value


async def test_draining_and_a_dead_engine_refuse_with_503() -> None:
    client = FakeClient()
    target = FakeTarget(client)
    admission = Admission(max_queued_requests=4, request_timeout=60)
    client.is_alive = False
    error = await refused(admission, target, [([1], PARAMS)])
    assert (error.status, error.code) == (503, "engine_dead")
    assert error.message == "the engine of glm@v1 has stopped; restart the server"
    admission.begin_drain()
    with pytest.raises(APIError) as caught:  # checked as a call arrives (ServingState.route)
        admission.check_open()
    assert (caught.value.status, caught.value.code) == (503, "draining")
    assert caught.value.message == (
        "the server is shutting down and accepts no new requests; retry against another replica"
    )
    admission.expire()  # drain_timeout passed: a call accepted before is refused now
    error = await refused(admission, target, [([1], PARAMS)])
    assert (error.status, error.code) == (503, "shutdown")
    assert client.submitted == [] and admission.num_in_flight == 0


async def test_a_call_accepted_before_a_drain_is_admitted_during_it() -> None:
    client = FakeClient()
    admission = Admission(max_queued_requests=4, request_timeout=60)
    with admission.preparing():  # routed, its prompt being prepared
        assert admission.num_in_flight == 1
        admission.begin_drain()
    generation = await admission.start(FakeTarget(client), "call", [([1], PARAMS)])
    assert client.submitted and admission.num_in_flight == 1
    generation.close()
    assert admission.num_in_flight == 0


async def test_begin_drain_logs_once(caplog: pytest.LogCaptureFixture) -> None:
    target = FakeTarget(FakeClient())
    admission = Admission(max_queued_requests=4, request_timeout=60)
    await admission.start(target, "a", [([1], PARAMS)])
    with caplog.at_level(logging.INFO, logger="auto_glm.serving"):
        admission.begin_drain()
        assert [r.getMessage() for r in caplog.records] == [
            "draining: refusing new requests, 1 in flight"
        ]
        admission.begin_drain()
    assert admission.draining and len(caplog.records) == 1


async def test_queue_limit_counts_waiting_choices_exactly() -> None:
    client = FakeClient()
    target = FakeTarget(client)
    admission = Admission(max_queued_requests=3, request_timeout=60)
    first = await admission.start(target, "a", [([1], PARAMS), ([2], PARAMS)])
    assert (admission.num_waiting, admission.num_in_flight) == (2, 1)
    error = await refused(admission, target, [([3], PARAMS), ([4], PARAMS)])  # 2 + 2 > 3
    assert (error.status, error.code, error.headers) == (429, "queue_full", {"Retry-After": "1"})
    assert error.message == (
        "the server is busy: 2 requests are already waiting (max_queued_requests=3); "
        "retry after 1 s"
    )
    await admission.start(target, "b", [([3], PARAMS)])  # 2 + 1 == 3 fits
    assert admission.num_waiting == 3
    first.requests[0].status = RequestStatus.RUNNING  # given a batch slot: no longer waiting
    assert admission.num_waiting == 2
    assert [r.request_id for r in client.submitted] == ["a-0", "a-1", "b-0"]


async def test_an_empty_queue_takes_any_call() -> None:
    target = FakeTarget(FakeClient())
    admission = Admission(max_queued_requests=2, request_timeout=60)
    generation = await admission.start(target, "a", [([i + 1], PARAMS) for i in range(5)])
    assert len(generation.requests) == 5 and admission.num_waiting == 5


@pytest.mark.parametrize(
    ("limit", "words"), [("max_concurrent", "in flight"), ("max_queued", "waiting")]
)
async def test_tenant_limits(limit: str, words: str, tenancy: Tenancy) -> None:
    client = FakeClient()
    target = FakeTarget(client)
    admission = Admission(100, 60, tenancy=tenancy)
    acme, other = tenant("acme", rpm=60, **{limit: 3}), tenant("other", **{limit: 3})
    # nothing in flight: any call; other tenants do not count
    await admission.start(target, "a", [([1], PARAMS)] * 3, tenant=acme)
    await admission.start(target, "b", [([1], PARAMS)] * 2, tenant=other)
    await admission.start(target, "c", [([1], PARAMS)] * 2)  # nor do anonymous calls
    error = await refused(admission, target, [([1], PARAMS)], tenant=acme)
    assert (error.status, error.code) == (429, f"{limit}_exceeded")
    assert error.headers == {
        "x-ratelimit-limit-requests": "60",
        "x-ratelimit-remaining-requests": "59",  # the call it refused did not count
        "x-ratelimit-reset-requests": error.headers["x-ratelimit-reset-requests"],
        "Retry-After": "1",
    }
    assert error.message == (
        f"tenant 'acme' has 3 requests {words} and this call adds 1, over its limit "
        f"{limit}=3; retry after 1 s"
    )
    await admission.start(target, "d", [([1], PARAMS)], tenant=other)  # 2 + 1 == 3 fits
    assert len(client.submitted) == 3 + 2 + 2 + 1


async def test_tenant_limit_counts_only_unfinished_choices(tenancy: Tenancy) -> None:
    target = FakeTarget(FakeClient())
    admission = Admission(100, 60, tenancy=tenancy)
    acme = tenant("acme", max_concurrent=2)
    generation = await admission.start(target, "a", [([1], PARAMS)] * 2, tenant=acme)
    generation._unfinished.discard(0)  # one choice finished
    await admission.start(target, "b", [([1], PARAMS)], tenant=acme)  # 1 + 1 == 2 fits


async def test_reservation_counts_each_prompt_once_and_every_choice() -> None:
    client, tenancy = FakeClient(), FakeTenancy()
    target = FakeTarget(client)
    admission = Admission(100, 60, tenancy=tenancy)
    shared, other = [1, 2, 3], [4, 5]
    work = [(shared, PARAMS), (shared, PARAMS), (other, SamplingParams(max_tokens=7))]
    acme = tenant("acme", weight=2.0)
    generation = await admission.start(
        target, "a", work, tenant=acme, priority=3, choices_per_prompt=2
    )
    assert tenancy.reserved == [("acme", 3 + 2 + 5 + 5 + 7)]
    assert generation.reservation == "reservation-1"
    options = client.submitted[0].options
    assert options["priority"] == 3 and options["cache_salt"] == "tenant:acme"
    assert options["tenant"] == "acme" and options["weight"] == 2.0
    for request, tokens in zip(client.submitted, ([7], [7, 8], [9]), strict=True):
        request.num_cached_tokens = 2
        client.finish(request, tokens)
    await generation.final()
    generation.close()
    # the shared prompt and its cached tokens count once, every choice's completion counts
    ((reservation, usage),) = tenancy.finished
    assert reservation == "reservation-1" and usage.model == "glm"
    assert (usage.prompt_tokens, usage.cached_tokens, usage.completion_tokens) == (5, 4, 4)
    assert (usage.requests, usage.errors) == (1, 0)


async def test_defaults_pass_through_to_the_engine() -> None:
    client, tenancy = FakeClient(), FakeTenancy()
    target = FakeTarget(client)
    admission = Admission(100, 60, tenancy=tenancy)
    caller = Exchange("call-1", Context(), asyncio.get_running_loop())
    generation = await admission.start(target, "a", [([1, 2], PARAMS), ([3], PARAMS)], caller)
    assert [r.sampling_params for r in client.submitted] == [PARAMS, PARAMS]
    assert [r.options["caller"] for r in client.submitted] == [caller] * 2
    assert [r.options["priority"] for r in client.submitted] == [0, 0]
    assert tenancy.reserved == [(None, 2 + 1 + 5 + 5)]
    other = await Admission(100, 60).start(FakeTarget(client), "b", [([1], PARAMS)])
    assert other.reservation is None
    generation.close()
    assert tenancy.finished == []  # an anonymous call records no usage
    generation = await admission.start(
        target, "c", [([1, 2], PARAMS), ([3], PARAMS)], tenant=tenant("t")
    )
    generation.close()
    ((_, usage),) = tenancy.finished
    assert usage.model == "glm" and usage.prompt_tokens == 3  # one choice per prompt


@pytest.mark.parametrize("zone", ["Etc/GMT-14", "Etc/GMT+12"])
async def test_usage_is_booked_on_the_utc_day(zone: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # at any instant, UTC+14 or UTC-12 (or both) is on another calendar day than UTC
    tenancy = FakeTenancy()
    target = FakeTarget(FakeClient())
    admission = Admission(100, 60, tenancy=tenancy)
    monkeypatch.setenv("TZ", zone)
    time.tzset()
    try:
        (await admission.start(target, "a", [([1], PARAMS)], tenant=tenant("t"))).close()
    finally:
        monkeypatch.undo()
        time.tzset()
    ((_, usage),) = tenancy.finished
    assert usage.day == datetime.now(timezone.utc).date()


async def test_a_bad_prompt_half_way_undoes_the_call() -> None:
    client, tenancy = FakeClient(), FakeTenancy()
    target = FakeTarget(client)
    admission = Admission(100, 60, tenancy=tenancy)
    acme = tenant("acme")
    error = await refused(admission, target, [([1, 2], PARAMS), ([0], PARAMS)], tenant=acme)
    assert (error.status, error.code) == (400, "invalid_prompt")
    assert error.message == "prompt token ids [0] are not allowed here"
    assert client.aborted == ["call-0"] and admission.num_in_flight == 0
    ((reservation, usage),) = tenancy.finished  # the reservation is settled, as an error
    assert reservation == "reservation-1"
    today = datetime.now(timezone.utc).date()
    assert (usage.tenant, usage.model, usage.day) == ("acme", "glm", today)
    assert (usage.requests, usage.prompt_tokens, usage.completion_tokens, usage.errors) == (
        1,
        2,
        0,
        1,
    )


async def test_an_engine_failure_half_way_is_raised_as_is() -> None:
    client = FakeClient()
    target = FakeTarget(client)
    admission = Admission(100, 60)
    with pytest.raises(EngineDeadError):
        await admission.start(target, "call", [([1], PARAMS), ([666], PARAMS)])
    assert client.aborted == ["call-0"] and admission.num_in_flight == 0


async def test_closing_records_usage_only_for_tenants() -> None:
    tenancy = FakeTenancy()
    target = FakeTarget(FakeClient())
    admission = Admission(100, 60, tenancy=tenancy)
    (await admission.start(target, "anonymous", [([1], PARAMS)])).close()
    assert tenancy.finished == [] and admission.num_in_flight == 0
    untracked = Admission(100, 60)
    (
        await untracked.start(FakeTarget(FakeClient()), "x", [([1], PARAMS)], tenant=tenant("a"))
    ).close()
    generation = await admission.start(target, "a", [([1, 2, 3], PARAMS)], tenant=tenant("acme"))
    released = target.released
    generation.close()
    generation.close()  # once only
    assert target.released == released + 1  # the served version is given back once
    ((_, usage),) = tenancy.finished
    assert (usage.requests, usage.prompt_tokens, usage.errors) == (1, 3, 1)


async def test_expire_fails_every_call_with_503() -> None:
    target = FakeTarget(FakeClient())
    admission = Admission(100, 60)
    calls = [await admission.start(target, str(i), [([1], PARAMS)]) for i in range(2)]
    admission.expire()
    for generation in calls:
        with pytest.raises(APIError) as caught:
            await generation.final()
        assert (caught.value.status, caught.value.code) == (503, "shutdown")
        assert caught.value.message == (
            "the server shut down (drain_timeout passed) before this request finished; retry it"
        )


async def test_a_whole_reply_sees_only_the_final_update() -> None:
    client = FakeClient()
    target = FakeTarget(client)
    admission = Admission(100, 60)
    streamed = await admission.start(target, "s", [([1], PARAMS)])  # streamed by default
    whole = await admission.start(target, "w", [([1], PARAMS)], stream=False)
    for request in client.submitted:
        client.finish(request, [7], finished=False)
        client.finish(request, [7, 8])
    assert [o.outputs.token_ids async for _, o in streamed.outputs()] == [[7], [7, 8]]
    assert [o.outputs.token_ids async for _, o in whole.outputs()] == [[7, 8]]


async def test_the_queue_limit_counts_each_engine_on_its_own() -> None:
    busy, idle = FakeClient(), FakeClient()
    first, second = FakeTarget(busy, "chat"), FakeTarget(idle, "other")
    admission = Admission(max_queued_requests=2, request_timeout=60)
    await admission.start(first, "a", [([1], PARAMS), ([2], PARAMS)])
    error = await refused(admission, first, [([3], PARAMS)])  # chat's engine has 2 waiting
    assert (error.status, error.code) == (429, "queue_full")
    await admission.start(second, "b", [([3], PARAMS), ([4], PARAMS)])  # other's queue is empty
    assert [r.request_id for r in idle.submitted] == ["b-0", "b-1"]
    assert admission.num_waiting == 4


async def test_a_call_whose_tokens_are_being_reserved_counts_as_waiting(
    tenancy: Tenancy,
) -> None:
    """Where budgets are kept in another process (Ray's quota keeper) the reservation is
    awaited; meanwhile the call already counts against the server's queue, so calls
    arriving then cannot pass it together. Its tenant's load counts it once it is placed
    (until then the keeper counts it: tests/cluster/test_quota_keeper_loads.py)."""
    gate = asyncio.Event()
    loads = []

    class RemoteTenancy:
        """Decides at once, as the keeper does; its answer takes until the gate opens."""

        async def reserve(self, tenant, tokens, load, choices):
            loads.append(load)
            held = await tenancy.reserve(tenant, tokens, load, choices)
            await gate.wait()
            return held

    client = FakeClient()
    admission = Admission(4, 60, tenancy=RemoteTenancy())
    acme = tenant("acme", max_concurrent=4)
    first = asyncio.create_task(
        admission.start(FakeTarget(client), "a", [([1], PARAMS)] * 3, tenant=acme)
    )
    await asyncio.sleep(0)  # past the checks, waiting for its reservation
    assert (admission.num_waiting, admission.num_in_flight) == (3, 1)
    # (without counting it, these calls would pass the checks and wait at the gate too)
    error = await asyncio.wait_for(refused(admission, FakeTarget(client), [([2], PARAMS)] * 2), 5)
    assert error.code == "queue_full"  # 3 + 2 > 4
    assert admission.tenant_load("acme") == Load()
    gate.set()
    placed = await first
    assert (admission.num_in_flight, admission.num_waiting) == (1, 3)
    assert admission.tenant_loads() == {"acme": Load(in_flight=3, waiting=3)}
    for request in placed.requests:
        request.status = RequestStatus.RUNNING  # given batch slots
    error = await refused(admission, FakeTarget(client), [([2], PARAMS)] * 2, tenant=acme)
    assert error.code == "max_concurrent_exceeded"  # 3 placed + 2 > 4
    assert loads == [Load(), Load(in_flight=3, waiting=0)]
