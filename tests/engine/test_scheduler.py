"""Scheduler: budgets, chunked prefill, preemption, stop conditions, aborts (random workloads:
test_scheduler_random.py)."""

from __future__ import annotations

import pytest

from auto_glm.engine.config import EngineConfig
from auto_glm.engine.kv_cache_manager import KVCacheManager
from auto_glm.engine.outputs import Prefix
from auto_glm.engine.plan import ModelRunnerOutput, SchedulerOutput
from auto_glm.engine.request import FinishReason, Request, RequestStatus
from auto_glm.engine.scheduler import Scheduler
from auto_glm.sampling_params import SamplingParams

BS = 4


def make_scheduler(
    num_blocks: int = 16,
    budget: int = 64,
    max_num_seqs: int = 8,
    max_model_len: int = 64,
    prefix_caching: bool = True,
) -> Scheduler:
    config = EngineConfig(
        block_size=BS,
        max_num_seqs=max_num_seqs,
        max_num_batched_tokens=budget,
        enable_prefix_caching=prefix_caching,
    )
    return Scheduler(config, KVCacheManager(num_blocks, BS, prefix_caching), max_model_len)


def make_request(
    request_id: str,
    tokens: list[int],
    arrival: float = 0.0,
    priority: int = 0,
    eos: frozenset[int] = frozenset(),
    salt: str | None = None,
    **params: object,
) -> Request:
    params.setdefault("max_tokens", 16)
    return Request(
        request_id,
        tokens,
        SamplingParams(**params),
        eos_token_ids=eos,
        priority=priority,
        cache_salt=salt,
        arrival_time=arrival,
    )


def sample(plan: SchedulerOutput, token: int = 7) -> ModelRunnerOutput:
    """The fake runner: one token for each request whose fed tokens reached its end. For a
    plan made ahead, whose tokens in flight count, call it as the plan is launched, before
    the step before's tokens are applied."""
    in_flight = plan.pending or [False] * len(plan.requests)
    ids = [
        request.request_id
        for request, n, start, ahead in zip(
            plan.requests, plan.num_scheduled_tokens, plan.start_positions, in_flight, strict=True
        )
        if start + n == request.num_tokens + ahead
    ]
    return ModelRunnerOutput(ids, [token] * len(ids))


def step(scheduler: Scheduler, token: int = 7) -> tuple[SchedulerOutput, list[Request]]:
    plan = scheduler.schedule()
    return plan, scheduler.update_from_output(plan, sample(plan, token))


def test_chunked_prefill_mixes_with_decodes() -> None:
    scheduler = make_scheduler(budget=8)
    a = make_request("a", [1, 2, 3], arrival=0)
    b = make_request("b", list(range(100, 120)), arrival=1)
    scheduler.add_request(a)
    scheduler.add_request(b)

    plan, updated = step(scheduler)
    assert plan.requests == [a, b] and plan.num_scheduled_tokens == [3, 5]
    assert plan.start_positions == [0, 0] and plan.block_tables == [[0], [1, 2]]
    assert plan.slot_mapping == [0, 1, 2, 4, 5, 6, 7, 8]
    assert updated == [a] and b.num_computed_tokens == 5

    plan, updated = step(scheduler)
    assert plan.num_scheduled_tokens == [1, 7] and plan.start_positions == [3, 5]
    assert plan.block_tables == [[0], [1, 2, 3]]
    assert plan.slot_mapping == [3, 9, 10, 11, 12, 13, 14, 15]
    assert updated == [a]

    plan, _ = step(scheduler)
    assert plan.num_scheduled_tokens == [1, 7] and plan.start_positions == [4, 12]
    assert plan.block_tables == [[0, 4], [1, 2, 3, 5, 6]]
    assert plan.slot_mapping == [16, 20, 21, 22, 23, 24, 25, 26]

    plan, updated = step(scheduler)
    assert plan.num_scheduled_tokens == [1, 1] and plan.slot_mapping == [17, 27]
    assert updated == [a, b] and b.output_token_ids == [7]


def test_waiting_queue_follows_priority_then_arrival() -> None:
    scheduler = make_scheduler(max_num_seqs=1)
    low = make_request("low", [1, 2], arrival=0, priority=1, max_tokens=1)
    late = make_request("late", [1, 2], arrival=2, max_tokens=1)
    early = make_request("early", [1, 2], arrival=1, max_tokens=1)
    for request in (low, late, early):
        scheduler.add_request(request)
    order = [step(scheduler)[0].requests for _ in range(3)]
    assert order == [[early], [late], [low]]
    assert not scheduler.has_unfinished_requests


def test_max_num_seqs_caps_running() -> None:
    scheduler = make_scheduler(max_num_seqs=2)
    for i in range(3):
        scheduler.add_request(make_request(str(i), [1, 2, 3], arrival=i))
    plan, _ = step(scheduler)
    assert [r.request_id for r in plan.requests] == ["0", "1"]
    assert (scheduler.num_running, scheduler.num_waiting) == (2, 1)


def test_head_of_line_request_is_not_overtaken() -> None:
    scheduler = make_scheduler(num_blocks=4)
    scheduler.add_request(make_request("a", list(range(9)), arrival=0, max_tokens=4))
    scheduler.add_request(make_request("big", list(range(20, 28)), arrival=1, max_tokens=1))
    scheduler.add_request(make_request("small", [5, 6], arrival=2, max_tokens=1))
    plan, _ = step(scheduler)
    assert [r.request_id for r in plan.requests] == ["a"]
    assert (scheduler.num_running, scheduler.num_waiting) == (1, 2)


def test_rejects_too_long_prompt_and_never_fitting_request() -> None:
    scheduler = make_scheduler(num_blocks=2, max_model_len=512)
    with pytest.raises(
        ValueError,
        match="prompt has 900 tokens but max_model_len is 512; "
        "shorten the prompt or raise max_model_len",
    ):
        scheduler.add_request(make_request("long", [1] * 900))
    with pytest.raises(ValueError) as caught:
        scheduler.add_request(make_request("big", [1] * 8, max_tokens=2))
    assert str(caught.value) == (
        "request may grow to 10 tokens (8 prompt + 2 generated) and needs KV for 9 of "
        "them, but the cache holds only 8 (2 blocks of 4); lower max_tokens or give the "
        "KV cache more memory"
    )
    scheduler.add_request(make_request("fits", [1] * 8, max_tokens=1))
    with pytest.raises(ValueError) as caught:
        scheduler.add_request(make_request("fits", [1]))
    assert str(caught.value) == "request id 'fits' is already in use; give each request a unique id"
    assert scheduler.num_waiting == 1 and scheduler.kv.num_free_blocks == 2


def test_preemption_frees_last_admitted_and_resumes_from_cache() -> None:
    scheduler = make_scheduler(num_blocks=4)
    a = make_request("a", list(range(7)), arrival=0, max_tokens=3)
    b = make_request("b", list(range(100, 107)), arrival=1, max_tokens=5)
    scheduler.add_request(a)
    scheduler.add_request(b)
    step(scheduler)
    plan, _ = step(scheduler)
    assert plan.block_tables == [[0, 1], [2, 3]] and plan.slot_mapping == [7, 15]

    plan, _ = step(scheduler)  # a needs a 3rd block: b goes
    assert plan.preempted == [b] and plan.requests == [a]
    assert a.block_ids == [] and a.finish_reason is FinishReason.LENGTH
    assert plan.block_tables == [[0, 1, 3]] and plan.slot_mapping == [12]
    assert b.status is RequestStatus.PREEMPTED and b.block_ids == []
    assert (b.num_computed_tokens, b.num_preemptions) == (0, 1)
    assert scheduler.num_preemptions_total == 1 and scheduler.num_waiting == 1

    plan, _ = step(scheduler)  # b's first block survived; its second was reused by a
    assert plan.requests == [b] and b.status is RequestStatus.RUNNING
    assert plan.start_positions == [4] and plan.num_scheduled_tokens == [5]
    assert plan.block_tables == [[2, 3, 1]]
    assert plan.slot_mapping == [12, 13, 14, 15, 4]
    assert b.num_cached_tokens == 0  # set at first admission only
    assert (scheduler.prefix_cache_queries, scheduler.prefix_cache_hits) == (7 + 7 + 9, 4)


def test_request_needing_a_block_preempts_itself_when_last() -> None:
    scheduler = make_scheduler(num_blocks=4)
    a = make_request("a", list(range(5)), arrival=0, max_tokens=4)
    b = make_request("b", list(range(100, 108)), arrival=1, max_tokens=4)
    scheduler.add_request(a)
    scheduler.add_request(b)
    step(scheduler)
    plan, _ = step(scheduler)
    assert plan.requests == [a] and plan.preempted == [b]
    assert a.block_ids == [0, 1]
    plan, _ = step(scheduler)  # b's cached blocks are idle but 3 blocks do not fit yet
    assert plan.requests == [a] and b.status is RequestStatus.PREEMPTED
    step(scheduler)  # a finishes
    plan, _ = step(scheduler)
    assert plan.requests == [b] and plan.start_positions == [8]
    assert plan.block_tables == [[2, 3, 1]] and plan.slot_mapping == [4]


def test_stop_conditions() -> None:
    scheduler = make_scheduler(max_model_len=8)
    eos = make_request("eos", [1, 2], eos=frozenset({2}))
    ignore = make_request("ignore", [1, 2], eos=frozenset({2}), ignore_eos=True, max_tokens=3)
    stop_id = make_request("stop_id", [1, 2], stop_token_ids=[2], ignore_eos=True)
    model_len = make_request("model_len", [1] * 6)
    for request in (eos, ignore, stop_id, model_len):
        scheduler.add_request(request)
    _, updated = step(scheduler, token=2)
    assert updated == [eos, ignore, stop_id, model_len]
    assert eos.finish_reason is FinishReason.STOP and eos.output_token_ids == [2]
    assert stop_id.finish_reason is FinishReason.STOP
    assert ignore.finish_reason is None and model_len.finish_reason is None
    step(scheduler, token=2)
    assert model_len.finish_reason is FinishReason.LENGTH and model_len.num_tokens == 8
    _, updated = step(scheduler, token=2)
    assert updated == [ignore] and ignore.finish_reason is FinishReason.LENGTH
    assert ignore.output_token_ids == [2, 2, 2] and ignore.is_finished
    assert scheduler.num_running == 0 and scheduler.kv_usage == 0.0


def test_abort_in_every_state() -> None:
    scheduler = make_scheduler(num_blocks=4, budget=4)
    waiting = make_request("waiting", [1, 2], arrival=5, max_tokens=2)
    scheduler.add_request(waiting)
    assert scheduler.abort_request("waiting") is waiting
    assert waiting.status is RequestStatus.FINISHED and waiting.finish_reason is FinishReason.ABORT
    assert scheduler.abort_request("waiting") is None and scheduler.abort_request("nope") is None

    prefill = make_request("prefill", list(range(10)), max_tokens=2)
    scheduler.add_request(prefill)
    plan = scheduler.schedule()
    assert prefill.num_computed_tokens == 4 and scheduler.kv_usage > 0
    assert scheduler.abort_request("prefill") is prefill
    assert scheduler.update_from_output(plan, ModelRunnerOutput(["prefill"], [3])) == []
    assert prefill.output_token_ids == [] and scheduler.kv_usage == 0.0
    assert not scheduler.has_unfinished_requests


def test_abort_preempted_and_finish_with_reason() -> None:
    scheduler = make_scheduler(num_blocks=4)
    a = make_request("a", list(range(5)), arrival=0, max_tokens=4)
    b = make_request("b", list(range(100, 108)), arrival=1, max_tokens=4)
    scheduler.add_request(a)
    scheduler.add_request(b)
    step(scheduler)
    step(scheduler)
    assert b.status is RequestStatus.PREEMPTED
    assert scheduler.abort_request("b") is b and b.finish_reason is FinishReason.ABORT
    assert scheduler.num_waiting == 0
    assert scheduler.finish_request("a", FinishReason.STOP) is a
    assert a.finish_reason is FinishReason.STOP and a.block_ids == []
    assert scheduler.kv_usage == 0.0 and scheduler.num_running == 0


def test_shared_prefix_sets_num_cached_tokens() -> None:
    scheduler = make_scheduler()
    first = make_request("first", list(range(10)), arrival=0)
    scheduler.add_request(first)
    step(scheduler)
    second = make_request("second", [*range(8), 42], arrival=1)
    scheduler.add_request(second)
    plan, _ = step(scheduler)
    assert second.num_cached_tokens == 8 and plan.start_positions == [10, 8]
    assert plan.block_tables[1][:2] == first.block_ids[:2]


def test_kv_manager_with_another_block_size_is_refused() -> None:
    config = EngineConfig(block_size=BS)
    with pytest.raises(ValueError) as caught:
        Scheduler(config, KVCacheManager(8, 2 * BS), max_model_len=64)
    assert str(caught.value) == (
        "KV cache manager has block_size=8 but the config says 4; build both from one config"
    )


def test_a_request_is_accepted_only_fresh() -> None:
    scheduler = make_scheduler()
    done = make_request("done", [1, 2], max_tokens=1)
    scheduler.add_request(done)
    step(scheduler)
    assert done.is_finished and done.block_ids == []
    with pytest.raises(ValueError) as caught:
        scheduler.add_request(done)  # finished: no blocks left, but not fresh either
    assert str(caught.value) == (
        "request 'done' was already scheduled (status finished); submit a fresh Request"
    )
    assert not scheduler.has_unfinished_requests


def test_a_budget_of_one_feeds_one_token_per_step() -> None:
    scheduler = make_scheduler(budget=1)
    a = make_request("a", [1, 2, 3], max_tokens=2)
    scheduler.add_request(a)
    counts = [step(scheduler)[0].num_scheduled_tokens for _ in range(4)]
    assert counts == [[1], [1], [1], [1]]  # three prompt tokens, then one decode
    assert not scheduler.has_unfinished_requests
    assert a.output_token_ids == [7, 7] and a.finish_reason is FinishReason.LENGTH


def test_a_request_still_awaiting_its_token_is_skipped() -> None:
    scheduler = make_scheduler()
    a, b, c = (make_request(n, [1, 2], arrival=i) for i, n in enumerate("abc"))
    for request in (a, b, c):
        scheduler.add_request(request)
    plan = scheduler.schedule()
    # the runner returns tokens for a and c only; b's has not come back yet
    scheduler.update_from_output(plan, ModelRunnerOutput(["a", "c"], [7, 7]))
    plan = scheduler.schedule()
    assert plan.requests == [a, c] and plan.num_scheduled_tokens == [1, 1]
    assert plan.start_positions == [2, 2] and plan.slot_mapping == [2, 10]
    assert b.num_computed_tokens == 2 and b.status is RequestStatus.RUNNING


def test_runner_output_must_pair_ids_with_tokens() -> None:
    scheduler = make_scheduler()
    scheduler.add_request(make_request("a", [1, 2]))
    plan = scheduler.schedule()
    with pytest.raises(ValueError):
        scheduler.update_from_output(plan, ModelRunnerOutput(["a"], []))


def test_token_of_an_aborted_request_does_not_stop_the_others() -> None:
    scheduler = make_scheduler()
    a, b = make_request("a", [1, 2], arrival=0), make_request("b", [3, 4], arrival=1)
    scheduler.add_request(a)
    scheduler.add_request(b)
    plan = scheduler.schedule()
    scheduler.abort_request("a")
    assert scheduler.update_from_output(plan, sample(plan)) == [b]
    assert a.output_token_ids == [] and b.output_token_ids == [7]


def test_waiting_requests_take_exactly_the_budget_left() -> None:
    scheduler = make_scheduler(budget=8)
    a = make_request("a", list(range(8)), arrival=0)
    b = make_request("b", [1, 2], arrival=1)
    scheduler.add_request(a)
    scheduler.add_request(b)
    plan, _ = step(scheduler)  # a's prompt takes all 8: b must not be admitted with 0
    assert plan.requests == [a] and plan.num_scheduled_tokens == [8]
    assert (scheduler.num_running, scheduler.num_waiting) == (1, 1) and b.block_ids == []

    scheduler = make_scheduler(budget=8)
    a = make_request("a", list(range(7)), arrival=0)
    b = make_request("b", [1, 2], arrival=1)
    scheduler.add_request(a)
    scheduler.add_request(b)
    plan, _ = step(scheduler)  # one token of budget is left: b starts its prefill with it
    assert plan.requests == [a, b] and plan.num_scheduled_tokens == [7, 1]
    assert b.num_computed_tokens == 1 and scheduler.num_waiting == 0


def test_a_request_can_be_preempted_twice() -> None:
    scheduler = make_scheduler(num_blocks=4)
    a = make_request("a", [1], arrival=0, max_tokens=5)
    b = make_request("b", [100, 101, 102], arrival=1, max_tokens=8)
    c = make_request("c", [200, 201, 202], arrival=2, max_tokens=5)
    for request in (a, b, c):
        scheduler.add_request(request)
    for _ in range(100):
        if not scheduler.has_unfinished_requests:
            break
        step(scheduler)
    assert [r.num_preemptions for r in (a, b, c)] == [0, 0, 2]
    assert scheduler.num_preemptions_total == 2
    assert [r.num_output_tokens for r in (a, b, c)] == [5, 8, 5]
    assert scheduler.kv.num_free_blocks == 4


def test_prompt_must_leave_room_for_one_token() -> None:
    scheduler = make_scheduler(max_model_len=8)
    with pytest.raises(ValueError) as caught:
        scheduler.check_prompt_length(8)
    assert str(caught.value) == (
        "prompt has 8 tokens but max_model_len is 8; shorten the prompt or raise max_model_len"
    )
    scheduler.check_prompt_length(7)
    scheduler.add_request(make_request("fits", list(range(7)), max_tokens=1))
    assert scheduler.num_waiting == 1


def test_get_request_finds_only_unfinished_requests() -> None:
    scheduler = make_scheduler()
    a = make_request("a", [1, 2], max_tokens=1)
    scheduler.add_request(a)
    assert scheduler.get_request("a") is a and scheduler.get_request("b") is None
    step(scheduler)
    assert a.is_finished and scheduler.get_request("a") is None


def test_a_step_short_of_blocks_admits_no_one() -> None:
    config = EngineConfig(
        block_size=BS, max_num_seqs=2, max_num_batched_tokens=64, queue_policy="priority"
    )
    scheduler = Scheduler(config, KVCacheManager(3, BS), max_model_len=64)
    a = make_request("a", [0, 1, 2], arrival=0, priority=0, max_tokens=3)
    b = make_request("b", [100, 101, 102], arrival=0, priority=1, max_tokens=3)
    c = make_request("c", [200], arrival=1, priority=0, max_tokens=1)
    scheduler.add_request(a)
    scheduler.add_request(b)
    step(scheduler)
    scheduler.add_request(c)  # both slots are taken: c waits
    plan, _ = step(scheduler)
    assert plan.requests == [a, b]
    plan, _ = step(scheduler)  # a needs a second block: b goes, and c must not come in yet
    assert plan.requests == [a] and plan.preempted == [b]
    assert scheduler.num_waiting == 2 and c.block_ids == []
    plan, _ = step(scheduler)
    assert plan.requests == [c, b] and plan.num_scheduled_tokens == [1, 1]


def test_fair_policy_preempts_nobody_while_a_slot_is_free() -> None:
    config = EngineConfig(
        block_size=BS, max_num_seqs=4, max_num_batched_tokens=64, queue_policy="fair"
    )
    scheduler = Scheduler(config, KVCacheManager(64, BS), max_model_len=64)
    hog = [
        Request(f"a{i}", [i + 1], SamplingParams(max_tokens=50), arrival_time=i, tenant="a")
        for i in range(3)
    ]
    for request in hog:
        scheduler.add_request(request)
    step(scheduler)
    late = Request("b0", [9], SamplingParams(max_tokens=50), arrival_time=5, tenant="b")
    scheduler.add_request(late)
    plan, _ = step(scheduler)
    assert plan.preempted == [] and plan.requests == [*hog, late]


def test_a_plans_block_tables_are_views_that_keep_what_they_held() -> None:
    """A plan's block table is a view of the request's own ``block_ids`` list up to its
    length when planned (no copy per step, however long the request): the blocks that
    later steps add, and the new list that a finish gives it, leave it as it was."""
    scheduler = make_scheduler(num_blocks=16)
    a = make_request("a", list(range(7)), max_tokens=10)
    scheduler.add_request(a)
    plans, held = [], []
    while scheduler.has_unfinished_requests:
        plan = scheduler.schedule()
        plans.append(plan)
        held.append(list(a.block_ids))  # what the table must still show later
        scheduler.update_from_output(plan, sample(plan))
    grown = [len(p.block_tables[0]) for p in plans]
    assert grown == sorted(grown) and grown[0] < grown[-1]  # blocks were added on the way
    assert a.block_ids == [] and a.status is RequestStatus.FINISHED  # freed: a new list
    for plan, blocks in zip(plans, held, strict=True):
        (table,) = plan.block_tables
        assert type(table) is Prefix and table == blocks and list(table) == blocks
    assert plans[0].block_tables[0]._items is plans[-1].block_tables[0]._items  # one list


def _ids(plan: SchedulerOutput) -> list[str]:
    return [r.request_id for r in plan.requests]


def test_the_requests_of_a_failed_step_run_again_alone_in_order_until_past_it() -> None:
    scheduler = make_scheduler(budget=8)
    a, b = make_request("a", [1] * 3, arrival=0), make_request("b", [2] * 10, arrival=1)
    c = make_request("c", [3] * 2, arrival=2)
    for request in (a, b, c):
        scheduler.add_request(request)
    failed = scheduler.schedule()  # a whole, b's first 5 tokens; c waits for budget
    assert _ids(failed) == ["a", "b"] and failed.num_scheduled_tokens == [3, 5]
    assert scheduler.quarantine([failed]) == [a, b]
    assert scheduler.forget_written([failed]) == [0, 1, 2]  # b's full block was indexed
    assert scheduler.kv.pool.block_hash(1) is None and scheduler.kv.num_free_blocks == 16
    assert (a.status, a.num_computed_tokens, a.block_ids) == (RequestStatus.PREEMPTED, 0, [])
    assert scheduler.is_suspect(a) and scheduler.is_suspect(b) and not scheduler.is_suspect(c)

    plan, updated = step(scheduler)  # a alone, and past its failed step at once
    assert _ids(plan) == ["a"] and updated == [a] and not scheduler.is_suspect(a)
    assert scheduler.schedule_ahead(max_batch=8) is None  # b is still a suspect
    plan, _ = step(scheduler)  # b alone, up to the end of its failed step (not its budget)
    assert _ids(plan) == ["b"] and plan.num_scheduled_tokens == [5]
    assert plan.start_positions == [0] and not scheduler.is_suspect(b)
    plan, _ = step(scheduler)  # together again, c admitted
    assert _ids(plan) == ["a", "b", "c"] and plan.num_scheduled_tokens == [1, 5, 2]
    assert scheduler.num_preemptions_total == 2


def test_a_suspect_runs_alone_over_several_chunks_while_the_others_wait() -> None:
    scheduler = make_scheduler(budget=4, prefix_caching=False)
    x = make_request("x", [4] * 2, arrival=0)
    scheduler.add_request(x)
    step(scheduler)  # x decodes from now on
    s = make_request("s", [5] * 12, arrival=1, priority=-1)
    scheduler.add_request(s)
    step(scheduler)  # x's token, then s's first 3 tokens
    failed = scheduler.schedule()  # s goes first now: 4 more, and no budget left for x
    assert _ids(failed) == ["s"] and (failed.start_positions, failed.num_scheduled_tokens) == (
        [3],
        [4],
    )
    assert scheduler.quarantine([failed]) == [s]
    # s computes its first 7 tokens again, alone, in chunks of the budget; x waits
    plans = [step(scheduler)[0] for _ in range(2)]
    assert [(_ids(p), p.num_scheduled_tokens) for p in plans] == [(["s"], [4]), (["s"], [3])]
    assert not scheduler.is_suspect(s) and x.num_computed_tokens == x.num_tokens - 1
    plan, _ = step(scheduler)
    assert _ids(plan) == ["s"] and plan.num_scheduled_tokens == [4]  # as before it failed
    plan, _ = step(scheduler)
    assert _ids(plan) == ["s", "x"] and plan.num_scheduled_tokens == [1, 1]


def test_an_aborted_suspect_is_no_longer_one() -> None:
    scheduler = make_scheduler(budget=8)
    a, b = make_request("a", [1] * 3, arrival=0), make_request("b", [2] * 3, arrival=1)
    scheduler.add_request(a)
    scheduler.add_request(b)
    scheduler.quarantine([scheduler.schedule()])
    scheduler.abort_request("a")
    assert not scheduler.is_suspect(a)
    plan, _ = step(scheduler)
    assert _ids(plan) == ["b"] and not scheduler.is_suspect(b)
