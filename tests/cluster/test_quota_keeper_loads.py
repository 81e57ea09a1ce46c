"""The quota keeper's sum of every ingress replica's tenant loads, without Ray: what a
reservation counts, calls admitted but not yet placed, reports that arrive out of order,
and replicas that fall silent."""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path

import pytest

from auto_glm.cluster.loads import FORGET_S, ReplicaLoads
from auto_glm.cluster.quotas import QuotaKeeper
from auto_glm.tenants import Tenant, TenantLimits
from auto_glm.tenants.loads import Load
from auto_glm.tenants.quotas import Reservation


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def tenant(name: str, **limits) -> Tenant:
    return Tenant(name, TenantLimits(**limits), datetime(2024, 1, 1, tzinfo=timezone.utc))


NONE = frozenset()


def test_each_replica_counts_once_and_only_its_latest_report() -> None:
    loads = ReplicaLoads(Clock())
    loads.update("a", 1, NONE, {"acme": Load(2, 1)})
    loads.update("b", 1, NONE, {"acme": Load(3, 0), "other": Load(1, 1)})
    assert loads.total("acme") == Load(5, 1)
    loads.update("b", 3, NONE, {"acme": Load(1, 0)})
    loads.update("b", 2, NONE, {"acme": Load(9, 9)})  # sent before report 3: arrived late
    assert loads.total("acme") == Load(3, 1)
    assert loads.total("nobody") == Load()


def test_an_admitted_call_counts_until_a_report_says_it_was_placed() -> None:
    loads = ReplicaLoads(Clock())
    loads.update("a", 4, frozenset({3, 4}), {"acme": Load()})
    loads.admit("a", 4, "acme", 2)
    loads.admit("a", 3, "acme", 1)  # sent first, admitted after 4 (another batch)
    assert loads.total("acme") == Load(3, 3)
    loads.update("a", 5, frozenset({3, 4}), {"acme": Load()})  # sent while both were coming
    assert loads.total("acme") == Load(3, 3)
    loads.update("a", 6, frozenset({3}), {"acme": Load(2, 1)})  # 4 placed before 3
    assert loads.total("acme") == Load(3, 2)
    loads.update("a", 7, NONE, {"acme": Load(3, 1)})
    assert loads.total("acme") == Load(3, 1)
    loads.admit("a", 8, "acme", 1)
    loads.update("a", 9, NONE, {}, whole=True)  # call 8 was dropped (its client left)
    assert loads.total("acme") == Load()


def test_a_whole_report_drops_tenants_left_out_but_not_newer_news() -> None:
    loads = ReplicaLoads(Clock())
    loads.update("a", 1, NONE, {"acme": Load(2, 2), "other": Load(1, 0)})
    loads.update("a", 5, NONE, {"other": Load(4, 0)})  # sent after the report, came first
    loads.update("a", 4, NONE, {}, whole=True)  # no calls left when report 4 was sent
    assert loads.total("acme") == Load()
    assert loads.total("other") == Load(4, 0)
    loads.update("a", 3, NONE, {"acme": Load(7, 7)})  # older than the whole report
    assert loads.total("acme") == Load()


def test_a_silent_replica_is_forgotten() -> None:
    clock = Clock()
    loads = ReplicaLoads(clock)
    loads.update("dead", 1, NONE, {"acme": Load(4, 0)})
    loads.admit("dead", 2, "acme", 1)
    loads.update("live", 1, NONE, {"acme": Load(1, 0)})
    clock.now += FORGET_S / 2
    loads.update("live", 2, NONE, {"acme": Load(1, 0)}, whole=True)
    assert loads.total("acme") == Load(6, 1)
    clock.now += FORGET_S / 2 + 0.1  # "dead" has not reported for more than FORGET_S
    assert loads.total("acme") == Load(1, 0)


@pytest.fixture
def keeper(tmp_path: Path) -> QuotaKeeper:
    return QuotaKeeper(f"sqlite:///{tmp_path / 'tenants.db'}")


async def test_the_keeper_holds_max_concurrent_across_replicas(keeper: QuotaKeeper) -> None:
    acme = tenant("acme", max_concurrent=3, tpm=1000)
    _, held = await keeper.reserve("a", 0, frozenset({0}), acme, 100, Load(), 2)
    assert isinstance(held, Reservation)
    # replica b has nothing of acme's, but a's 2 choices count at once
    state, refusal = await keeper.reserve("b", 0, frozenset({0}), acme, 100, Load(), 2)
    assert refusal == (
        "max_concurrent",
        "tenant 'acme' has 2 requests in flight and this call adds 2, over its limit "
        "max_concurrent=3; retry after 1 s",
        1,
    )
    assert state.remaining_tokens == 900  # a refused call reserves nothing
    _, fits = await keeper.reserve("b", 1, frozenset({1}), acme, 100, Load(), 1)
    assert isinstance(fits, Reservation)
    await keeper.settle("a", 1, NONE, held, 40, Load())  # a's call ended
    _, fits = await keeper.reserve("b", 2, frozenset({2}), acme, 100, Load(1, 0), 2)
    assert isinstance(fits, Reservation)


async def test_calls_being_admitted_on_one_replica_count_once(keeper: QuotaKeeper) -> None:
    """Six calls at once on one replica, none placed yet: each is counted as the keeper
    admits it, and a refused one not at all, so the message names the calls in flight."""
    acme = tenant("acme", max_concurrent=2)
    answers = [
        await keeper.reserve("a", seq, frozenset(range(seq + 1)), acme, 10, Load(), 1)
        for seq in range(6)
    ]
    assert [isinstance(held, Reservation) for _, held in answers] == [True] * 2 + [False] * 4
    assert {held[1] for _, held in answers[2:]} == {
        "tenant 'acme' has 2 requests in flight and this call adds 1, over its limit "
        "max_concurrent=2; retry after 1 s"
    }


async def test_the_keeper_holds_max_queued_by_the_reports(keeper: QuotaKeeper) -> None:
    acme = tenant("acme", max_queued=2)
    _, held = await keeper.reserve("a", 0, frozenset({0}), acme, 10, Load(), 2)
    assert isinstance(held, Reservation)
    _, refusal = await keeper.reserve("b", 0, frozenset({0}), acme, 10, Load(), 1)
    assert refusal[0] == "max_queued"
    await keeper.report("a", 1, NONE, {"acme": Load(2, 0)})  # placed, both got batch slots
    _, fits = await keeper.reserve("b", 1, frozenset({1}), acme, 10, Load(), 1)
    assert isinstance(fits, Reservation)


async def test_one_batch_of_calls_runs_in_order(keeper: QuotaKeeper) -> None:
    acme = tenant("acme", rpm=2, max_concurrent=1)
    first, second, checked = await keeper.apply(
        [
            ("reserve", ("a", 0, frozenset({0}), acme, 10, Load(), 1)),
            ("reserve", ("a", 1, frozenset({0, 1}), acme, 10, Load(), 1)),  # 0 not placed
            ("check_requests", (acme,)),
        ]
    )
    assert isinstance(first[1], Reservation)
    assert second[1][0] == "max_concurrent"
    assert checked[0].remaining_requests == 1 and checked[1] is None
    with pytest.raises(ValueError, match="the quota keeper has no call 'store'"):
        await keeper.apply([("store", ())])
