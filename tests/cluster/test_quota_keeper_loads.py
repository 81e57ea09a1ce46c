"""The quota keeper's sum of every ingress replica's tenant loads, without Ray: what a
reservation counts, reports that arrive out of order, and replicas that fall silent."""

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


def test_each_replica_counts_once_and_only_its_latest_report() -> None:
    loads = ReplicaLoads(Clock())
    loads.update("a", 1, {"acme": Load(2, 1)})
    loads.update("b", 1, {"acme": Load(3, 0), "other": Load(1, 1)})
    assert loads.others("a", "acme") == Load(3, 0)
    assert loads.others("b", "acme") == Load(2, 1)
    assert loads.others("c", "acme") == Load(5, 1)
    loads.update("b", 3, {"acme": Load(1, 0)})
    loads.update("b", 2, {"acme": Load(9, 9)})  # sent before report 3: arrived late
    assert loads.others("a", "acme") == Load(1, 0)
    assert loads.others("a", "nobody") == Load()


def test_a_whole_report_drops_tenants_left_out_but_not_newer_news() -> None:
    loads = ReplicaLoads(Clock())
    loads.update("a", 1, {"acme": Load(2, 2), "other": Load(1, 0)})
    loads.update("a", 5, {"other": Load(4, 0)})  # a reservation sent after the report
    loads.update("a", 4, {}, whole=True)  # no calls left when report 4 was sent
    assert loads.others("b", "acme") == Load()
    assert loads.others("b", "other") == Load(4, 0)
    loads.update("a", 3, {"acme": Load(7, 7)})  # older than the whole report
    assert loads.others("b", "acme") == Load()


def test_a_silent_replica_is_forgotten() -> None:
    clock = Clock()
    loads = ReplicaLoads(clock)
    loads.update("dead", 1, {"acme": Load(4, 0)})
    loads.update("live", 1, {"acme": Load(1, 0)})
    clock.now += FORGET_S / 2
    loads.update("live", 2, {"acme": Load(1, 0)}, whole=True)
    assert loads.others("x", "acme") == Load(5, 0)
    clock.now += FORGET_S / 2 + 0.1  # "dead" has not reported for more than FORGET_S
    assert loads.others("x", "acme") == Load(1, 0)


@pytest.fixture
def keeper(tmp_path: Path) -> QuotaKeeper:
    return QuotaKeeper(f"sqlite:///{tmp_path / 'tenants.db'}")


async def test_the_keeper_holds_max_concurrent_across_replicas(keeper: QuotaKeeper) -> None:
    acme = tenant("acme", max_concurrent=3, tpm=1000)
    _, held = await keeper.reserve("a", 0, acme, 100, Load(), 2)
    assert isinstance(held, Reservation)
    # replica b has nothing of acme's, but a's 2 choices count at once
    state, refusal = await keeper.reserve("b", 0, acme, 100, Load(), 2)
    assert refusal == (
        "max_concurrent",
        "tenant 'acme' has 2 requests in flight and this call adds 2, over its limit "
        "max_concurrent=3; retry after 1 s",
        1,
    )
    assert state.remaining_tokens == 900  # a refused call reserves nothing
    _, fits = await keeper.reserve("b", 1, acme, 100, Load(), 1)
    assert isinstance(fits, Reservation)
    await keeper.settle("a", 1, held, 40, Load())  # a's call ended
    _, fits = await keeper.reserve("b", 2, acme, 100, Load(1, 0), 2)
    assert isinstance(fits, Reservation)


async def test_the_keeper_holds_max_queued_by_the_reports(keeper: QuotaKeeper) -> None:
    acme = tenant("acme", max_queued=2)
    _, held = await keeper.reserve("a", 0, acme, 10, Load(), 2)
    assert isinstance(held, Reservation)
    _, refusal = await keeper.reserve("b", 0, acme, 10, Load(), 1)
    assert refusal[0] == "max_queued"
    await keeper.report("a", 1, {"acme": Load(2, 0)})  # both choices got batch slots
    _, fits = await keeper.reserve("b", 1, acme, 10, Load(), 1)
    assert isinstance(fits, Reservation)


async def test_one_batch_of_calls_runs_in_order(keeper: QuotaKeeper) -> None:
    acme = tenant("acme", rpm=2, max_concurrent=1)
    first, second, checked = await keeper.apply(
        [
            ("reserve", ("a", 0, acme, 10, Load(), 1)),
            ("reserve", ("a", 1, acme, 10, Load(1, 1), 1)),  # the first is still running
            ("check_requests", (acme,)),
        ]
    )
    assert isinstance(first[1], Reservation)
    assert second[1][0] == "max_concurrent"
    assert checked[0].remaining_requests == 1 and checked[1] is None
    with pytest.raises(ValueError, match="the quota keeper has no call 'store'"):
        await keeper.apply([("store", ())])
