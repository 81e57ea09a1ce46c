"""Queue policies in the real scheduler, with no model: order, preemption, fair shares."""

from __future__ import annotations

from collections import Counter

import pytest

from auto_glm.engine.config import EngineConfig
from auto_glm.engine.kv_cache_manager import KVCacheManager
from auto_glm.engine.queue_policy import FairPolicy, make_policy
from auto_glm.engine.request import Request, RequestStatus
from auto_glm.engine.scheduler import Scheduler
from auto_glm.sampling_params import SamplingParams
from tests.engine.test_scheduler import sample

BS = 4


def scheduler(policy: str, *, num_blocks: int = 256, max_num_seqs: int = 4, budget: int = 64):
    config = EngineConfig(
        block_size=BS,
        max_num_seqs=max_num_seqs,
        max_num_batched_tokens=budget,
        queue_policy=policy,
    )
    return Scheduler(config, KVCacheManager(num_blocks, BS, True), max_model_len=512)


def request(
    rid: str,
    tenant: str | None,
    arrival: float,
    *,
    priority: int = 0,
    weight: float = 1.0,
    prompt: int = 4,
    max_tokens: int = 200,
) -> Request:
    return Request(
        rid,
        [hash((rid, i)) % 900 + 10 for i in range(prompt)],
        SamplingParams(max_tokens=max_tokens, ignore_eos=True),
        priority=priority,
        arrival_time=arrival,
        tenant=tenant,
        weight=weight,
        cache_salt=tenant,
    )


def step(s: Scheduler) -> list[Request]:
    plan = s.schedule()
    s.update_from_output(plan, sample(plan))
    return plan.requests


def tokens_by_tenant(s: Scheduler, steps: int) -> Counter:
    """Run ``steps`` steps; the tokens each tenant was fed."""
    served: Counter = Counter()
    for _ in range(steps):
        plan = s.schedule()
        for r, n in zip(plan.requests, plan.num_scheduled_tokens, strict=True):
            served[r.tenant] += n
        s.update_from_output(plan, sample(plan))
    return served


def first_step_running(s: Scheduler, rid: str, limit: int = 200) -> int:
    for n in range(limit):
        step(s)
        if s.get_request(rid) is not None and s.get_request(rid).status is RequestStatus.RUNNING:
            return n
    raise AssertionError(f"{rid} never ran in {limit} steps")


@pytest.mark.parametrize(("policy", "expected"), [("fcfs", "a"), ("priority", "b")])
def test_fcfs_ignores_priority_and_priority_uses_it(policy: str, expected: str) -> None:
    s = scheduler(policy, max_num_seqs=1)
    s.add_request(request("a", None, 0.0, priority=5))
    s.add_request(request("b", None, 1.0, priority=-5))
    assert [r.request_id for r in step(s)] == [expected]


def flood(s: Scheduler, tenant: str, count: int, weight: float = 1.0, start: float = 0.0):
    for i in range(count):
        s.add_request(request(f"{tenant}{i}", tenant, start + i * 1e-3, weight=weight))


@pytest.mark.parametrize("policy", ["fcfs", "priority"])
def test_without_fairness_a_flood_holds_every_slot(policy: str) -> None:
    s = scheduler(policy)
    flood(s, "a", 12)
    for _ in range(3):
        step(s)
    s.add_request(request("b0", "b", 10.0))
    for _ in range(100):  # a's running requests need 200 tokens each
        step(s)
        assert s.get_request("b0").status is not RequestStatus.RUNNING


def test_fair_gives_a_late_tenant_a_slot_within_a_few_steps() -> None:
    s = scheduler("fair")
    flood(s, "a", 12)
    for _ in range(3):
        step(s)
    s.add_request(request("b0", "b", 10.0))
    assert first_step_running(s, "b0") <= 2
    assert s.num_preemptions_total == 1  # one of a's requests made room
    running = Counter(r.tenant for r in s._running)
    assert running == {"a": 3, "b": 1}


def test_on_a_tie_the_tenant_holding_fewer_slots_is_admitted_first() -> None:
    s = scheduler("fair", max_num_seqs=4)
    for i in range(4):  # a holds every slot, then one of its requests ends
        s.add_request(request(f"a{i}", "a", i * 1e-3, max_tokens=6 if i == 0 else 200))
    s.add_request(request("a-next", "a", 0.5))  # waits, and arrived before b
    while s.get_request("a0") is not None:
        step(s)
    s.add_request(request("b0", "b", 1.0))  # b becomes active level with a
    step(s)  # a0's slot goes to b, which holds none, not to a's earlier request
    assert s.get_request("b0").status is RequestStatus.RUNNING
    assert s.get_request("a-next").status is RequestStatus.WAITING


def test_rebalancing_preempts_the_request_with_the_least_to_redo() -> None:
    s = scheduler("fair", max_num_seqs=3)
    s.add_request(request("a-long", "a", 0.0, prompt=40))
    s.add_request(request("a-short", "a", 0.001, prompt=4))
    s.add_request(request("a-mid", "a", 0.002, prompt=20))
    step(s)
    s.add_request(request("b0", "b", 1.0))
    plan = s.schedule()
    assert [r.request_id for r in plan.preempted] == ["a-short"]


def test_fair_shares_follow_the_weights() -> None:
    s = scheduler("fair", max_num_seqs=4)
    flood(s, "heavy", 30, weight=3.0)
    flood(s, "light", 30, weight=1.0)
    served = tokens_by_tenant(s, 400)
    ratio = served["heavy"] / served["light"]
    assert 2.5 < ratio < 3.5, served
    assert s.num_preemptions_total <= 2  # shares settle; no slot ping-pong


def test_equal_tenants_split_evenly_without_preemption() -> None:
    s = scheduler("fair", max_num_seqs=4)
    flood(s, "x", 30)
    flood(s, "y", 30, start=0.5)
    served = tokens_by_tenant(s, 300)
    assert abs(served["x"] - served["y"]) <= 0.05 * served["x"], served
    # x took all 4 slots first and gave 2 to y; after that, freed slots keep the balance
    assert s.num_preemptions_total <= 4


def test_an_idle_tenant_banks_no_credit() -> None:
    policy = FairPolicy()
    s = Scheduler(
        EngineConfig(block_size=BS, max_num_seqs=4, max_num_batched_tokens=64),
        KVCacheManager(256, BS, True),
        max_model_len=512,
        policy=policy,
    )
    flood(s, "a", 8)
    for _ in range(100):
        step(s)
    ahead = policy.virtual_time["a"]
    s.add_request(request("b0", "b", 10.0))
    # b starts level with a, not 100 steps behind it: it cannot lock a out
    assert policy.virtual_time["b"] == pytest.approx(ahead)


def test_under_kv_pressure_the_victim_comes_from_the_tenant_furthest_ahead() -> None:
    s = scheduler("fair", num_blocks=24, max_num_seqs=8)
    for i in range(3):  # a is served first and runs ahead
        s.add_request(request(f"a{i}", "a", i * 1e-3, max_tokens=60))
    for _ in range(4):
        step(s)
    s.add_request(request("b0", "b", 10.0, max_tokens=60))
    preempted = []
    for _ in range(40):
        plan = s.schedule()
        preempted += plan.preempted
        s.update_from_output(plan, sample(plan))
        if preempted:
            break
    assert preempted and all(r.tenant == "a" for r in preempted)


def test_unknown_policy_is_refused_by_name() -> None:
    with pytest.raises(ValueError, match="queue_policy='lottery' is invalid"):
        EngineConfig(queue_policy="lottery")
    with pytest.raises(ValueError, match="use one of fcfs, priority, fair"):
        make_policy("lottery")


# ---- FairPolicy's own rules, request by request -------------------------------------------
def _req(rid: str, tenant: str, weight: float = 1.0, computed: int = 0) -> Request:
    r = request(rid, tenant, 0.0, weight=weight)
    r.num_computed_tokens = computed
    return r


def test_a_new_tenant_is_levelled_only_with_tenants_still_active() -> None:
    policy = FairPolicy()
    a1, a2, c1 = _req("a1", "a"), _req("a2", "a"), _req("c1", "c")
    for r in (a1, a2, c1):
        policy.added(r)
    policy.charge(a1, 100)
    policy.charge(c1, 10)
    policy.finished(c1)  # c leaves with virtual time 10
    policy.finished(a1)  # a still has a2
    policy.added(_req("b1", "b"))
    assert policy.virtual_time["b"] == 100  # level with a, the only active tenant
    policy.finished(a2)  # now a is gone too
    policy.added(_req("d1", "d"))
    assert policy.virtual_time["d"] == 100  # b (100) is the only active one


def test_a_tenant_whose_last_request_ended_is_not_active() -> None:
    policy = FairPolicy()
    a1 = _req("a1", "a")
    policy.added(a1)
    policy.charge(a1, 50)
    policy.finished(a1)
    policy.added(_req("b1", "b"))
    assert policy.virtual_time["b"] == 0  # nobody active to level with
    a_again = _req("a2", "a")
    policy.added(a_again)
    assert policy.virtual_time["a"] == 50  # its own time, above b's


def test_ties_go_to_fewer_slots_per_weight() -> None:
    policy = FairPolicy()
    running = [_req("x1", "x", 4.0), _req("x2", "x", 4.0), _req("y1", "y")]
    waiting = [_req("y2", "y"), _req("x3", "x", 4.0)]
    # x holds 2 slots at weight 4 (0.5 per weight), y 1 at weight 1
    assert [r.request_id for r in policy.admission_order(waiting, running)] == ["x3", "y2"]


def test_no_rebalancing_without_waiting_requests() -> None:
    assert FairPolicy().rebalance_victim([], [_req("a1", "a"), _req("a2", "a")]) is None


def test_rebalancing_uses_weighted_shares() -> None:
    # b (weight 3) deserves 3 of 4 slots and holds none: a gives one up
    running = [_req(f"a{i}", "a") for i in range(4)]
    assert FairPolicy().rebalance_victim([_req("b0", "b", 3.0)], running) is not None


def test_rebalancing_stops_at_the_share_exactly() -> None:
    policy = FairPolicy()
    # b holds 1 of 4 with a share of 2: a (3) gives one up, and keeps exactly its share
    running = [_req("a1", "a"), _req("a2", "a"), _req("a3", "a"), _req("b1", "b")]
    assert running[policy.rebalance_victim([_req("b2", "b")], running)].tenant == "a"
    # b holds its share already, and c (not behind) waits: nobody gives up a slot
    six = [*(_req(f"a{i}", "a") for i in range(4)), _req("b1", "b"), _req("b2", "b")]
    policy.virtual_time["c"] = 1000
    assert policy.rebalance_victim([_req("b3", "b"), _req("c1", "c")], six) is None


def test_nobody_gives_up_a_slot_that_would_leave_it_under_its_share() -> None:
    # three equal tenants, 4 slots (4/3 each): a and c hold 2, one over their share but
    # not a whole slot over it, so b waits for the next free slot instead
    running = [_req("a1", "a"), _req("a2", "a"), _req("c1", "c"), _req("c2", "c")]
    assert FairPolicy().rebalance_victim([_req("b1", "b")], running) is None


def test_the_tenant_most_over_its_weighted_share_gives_up_the_slot() -> None:
    # z holds 5 at weight 1; a holds 3 at weight 0.5, i.e. 6 per weight: a is further over
    running = [
        *(_req(f"z{i}", "z") for i in range(5)),
        *(_req(f"a{i}", "a", 0.5) for i in range(3)),
    ]
    victim = FairPolicy().rebalance_victim([_req("b1", "b")], running)
    assert running[victim].tenant == "a"


def test_a_kv_victim_is_never_one_already_scheduled_in_the_step() -> None:
    policy = FairPolicy()
    running = [_req("a1", "a"), _req("b1", "b"), _req("b2", "b")]
    policy.virtual_time["a"] = 500  # a is furthest ahead, but a1 was scheduled already
    assert policy.victim(running, 1) in (1, 2)
    assert policy.victim(running, 0) == 0
