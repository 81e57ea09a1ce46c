"""Steps planned ahead (``EngineCore.overlap_steps``, on for GPUs with decode graphs): the
next step is planned and launched before the tokens of the one running are read back, and
it takes them on the device; prompt chunks and admissions go in it beside them.

On the CPU the padded decode path runs eagerly in triton's interpreter (as in
tests/engine/test_cuda_graphs.py) and the launch returns once the step is done, but the
planning, the device-side feed of the pending tokens and the dropping of a token sampled
after a stop are the same code, so the tests switch overlap on and compare every token with
the engine that plans each step after reading the last. The scheduler's rules come first,
with no model.
"""

from __future__ import annotations

import itertools
import json
import queue
from collections.abc import Callable

import jsonschema
import pytest

from auto_glm import GLMModel, SamplingParams
from auto_glm.engine.client import EngineRequestError
from auto_glm.engine.config import EngineConfig
from auto_glm.engine.kv_cache_manager import KVCacheManager
from auto_glm.engine.request import Request, RequestStatus
from auto_glm.engine.scheduler import Scheduler
from tests.engine.jobs import finals, run_together
from tests.engine.test_cuda_graphs import block_bytes, padded_model
from tests.engine.test_engine import stop_string_run
from tests.engine.test_nonfinite import (
    GREEDY,
    NON_FINITE,
    POISON,
    _healthy_prompts,
    _poison_token,
    _settled,
)
from tests.engine.test_scheduler import make_request, make_scheduler, sample
from tests.reference import hf_greedy, prefix_hit_batches, random_prompts
from tests.schemas import PERSON, PERSON_SCHEMA
from tests.triton_env import require_triton_interpreter


# ---- the scheduler, no model ----------------------------------------------------------
def _decoding(scheduler, *requests):
    """Admit ``requests`` and run their prefill step; returns that plan, its tokens not yet
    applied (the step is in flight)."""
    for request in requests:
        scheduler.add_request(request)
    return scheduler.schedule()


def test_the_step_ahead_decodes_every_running_request_at_its_next_position() -> None:
    scheduler = make_scheduler()
    a, b = make_request("a", [1, 2, 3]), make_request("b", [4, 5, 6, 7, 8])
    first = _decoding(scheduler, a, b)
    ahead = scheduler.schedule_ahead(max_batch=8)
    assert ahead is not None and ahead.feeds_pending and ahead.pending == [True, True]
    assert ahead.requests == [a, b] and ahead.num_scheduled_tokens == [1, 1]
    assert ahead.start_positions == [3, 5]  # the positions of the tokens still in flight
    assert ahead.slot_mapping == [3, 4 * 2 + 1]  # a: block 0; b: its 2nd block (id 2)
    assert a.num_computed_tokens == 4 and a.num_tokens == 3  # one ahead of its tokens
    sampled = sample(ahead, token=11)  # which rows sample is set at launch
    scheduler.update_from_output(first, sample(first, token=9))
    assert a.output_token_ids == [9] and a.num_computed_tokens == a.num_tokens == 4
    # nothing more to feed until the step ahead's tokens are back
    assert scheduler.schedule().is_empty
    scheduler.update_from_output(ahead, sampled)
    assert a.output_token_ids == [9, 11] and b.output_token_ids == [9, 11]


def _indexed(scheduler, request) -> int:
    """How many of ``request``'s leading blocks the prefix cache holds."""
    pool = scheduler.kv.pool
    blocks = zip(request.block_ids, request.block_hashes, strict=False)
    return sum(1 for _ in itertools.takewhile(lambda b: pool.lookup(b[1]) == b[0], blocks))


def test_the_step_ahead_admits_a_waiting_request_with_its_prompt_chunk() -> None:
    scheduler = make_scheduler(max_num_seqs=2)
    a, b = make_request("a", [1, 2]), make_request("b", [3, 4, 5, 6, 7])
    first = _decoding(scheduler, a)
    scheduler.add_request(b)
    ahead = scheduler.schedule_ahead(max_batch=8)
    assert ahead is not None and ahead.requests == [a, b] and ahead.pending == [True, False]
    assert ahead.num_scheduled_tokens == [1, 5] and ahead.start_positions == [2, 0]
    assert b.status is RequestStatus.RUNNING and b.metrics.first_scheduled_time is None
    assert _indexed(scheduler, b) == 1  # its prompt's full block is known: indexed at once
    sampled = sample(ahead, token=11)  # which rows sample is set at launch
    scheduler.update_from_output(first, sample(first, token=9))
    got = scheduler.update_from_output(ahead, sampled)
    assert got == [a, b] and a.output_token_ids == [9, 11] and b.output_token_ids == [11]
    # with the batch full, the waiting request waits either way
    full = make_scheduler(max_num_seqs=1)
    first = _decoding(full, make_request("a", [1, 2]))
    full.add_request(make_request("b", [3, 4]))
    ahead = full.schedule_ahead(max_batch=8)
    assert ahead is not None and [r.request_id for r in ahead.requests] == ["a"]


def test_no_step_ahead_where_the_policy_would_preempt_for_a_waiting_request() -> None:
    config = EngineConfig(
        block_size=4, max_num_seqs=2, max_num_batched_tokens=64, queue_policy="fair"
    )
    scheduler = Scheduler(config, KVCacheManager(16, 4, True), max_model_len=64)

    def tenant_request(request_id: str, tokens: list[int], tenant: str) -> Request:
        return Request(request_id, tokens, SamplingParams(max_tokens=8), tenant=tenant)

    first = _decoding(scheduler, tenant_request("a1", [1, 2], "a"), tenant_request("a2", [3], "a"))
    scheduler.add_request(tenant_request("b1", [4, 5], "b"))  # b holds none of its share
    assert scheduler.schedule_ahead(max_batch=8) is None
    scheduler.update_from_output(first, sample(first))
    assert "b1" in [r.request_id for r in scheduler.schedule().requests]  # in turn, it runs


def test_penalized_requests_go_ahead_but_not_a_batch_too_big() -> None:
    """Penalties count the token in flight on the device (see SamplingBatch.from_requests)."""
    for params in ({"repetition_penalty": 1.2}, {"presence_penalty": 0.5}):
        scheduler = make_scheduler()
        _decoding(scheduler, make_request("a", [1, 2]), make_request("p", [3], **params))
        ahead = scheduler.schedule_ahead(max_batch=8)
        assert ahead is not None and [r.request_id for r in ahead.requests] == ["a", "p"]
    scheduler = make_scheduler()
    _decoding(scheduler, make_request("a", [1, 2]), make_request("b", [3]))
    assert scheduler.schedule_ahead(max_batch=1) is None


def test_a_prefill_mid_prompt_feeds_its_next_chunk_ahead() -> None:
    scheduler = make_scheduler(budget=4)
    a, long = make_request("a", [1, 2]), make_request("long", list(range(10, 19)))
    first = _decoding(scheduler, a, long)
    assert first.num_scheduled_tokens == [2, 2]  # "long" is mid-prompt: it feeds next
    ahead = scheduler.schedule_ahead(max_batch=8)
    assert ahead is not None and ahead.pending == [True, False]
    assert ahead.num_scheduled_tokens == [1, 3] and ahead.start_positions == [2, 2]
    assert long.num_computed_tokens == 5 and _indexed(scheduler, long) == 1
    sampled = sample(ahead)
    scheduler.update_from_output(first, sample(first))
    assert scheduler.update_from_output(ahead, sampled) == [a]  # long: no token yet
    # a step that samples nothing (a long prompt's chunks) is followed ahead all the same
    alone = make_scheduler(budget=4)
    first = _decoding(alone, make_request("long", list(range(10, 19))))
    ahead = alone.schedule_ahead(max_batch=8)
    assert ahead is not None and not ahead.feeds_pending and ahead.start_positions == [4]


def test_no_step_ahead_without_free_blocks() -> None:
    # one free block, two requests at a block's end
    tight = make_scheduler(num_blocks=3)
    a, b = make_request("a", [1, 2, 3, 4], max_tokens=4), make_request("b", [5] * 4, max_tokens=4)
    _decoding(tight, a, b)
    assert tight.schedule_ahead(max_batch=8) is None
    assert tight.kv.num_free_blocks == 1  # no block was taken
    # with room for the decodes but not for the waiting prompt: decodes only, no preemption
    roomy = make_scheduler(num_blocks=4)
    a = make_request("a", [1, 2, 3, 4], max_tokens=4)
    _decoding(roomy, a)
    roomy.add_request(make_request("big", list(range(20, 31)), max_tokens=1))
    ahead = roomy.schedule_ahead(max_batch=8)
    assert ahead is not None and ahead.requests == [a] and roomy.num_waiting == 1


def test_a_request_whose_token_in_flight_is_its_last_is_left_out() -> None:
    scheduler = make_scheduler(max_model_len=6)
    last = make_request("last", [1, 2], max_tokens=1)
    full = make_request("full", [3, 4, 5, 6, 7])  # its next token reaches max_model_len
    going = make_request("going", [8])
    first = _decoding(scheduler, last, full, going)
    ahead = scheduler.schedule_ahead(max_batch=8)
    assert ahead is not None and ahead.requests == [going]
    scheduler.update_from_output(first, sample(first))
    assert last.is_finished and full.is_finished and not going.is_finished


def test_a_request_that_stops_on_the_token_in_flight_drops_the_token_ahead() -> None:
    scheduler = make_scheduler()
    stops = make_request("stops", [1, 2], eos=frozenset({9}))
    first = _decoding(scheduler, stops, make_request("other", [3]))
    ahead = scheduler.schedule_ahead(max_batch=8)
    sampled = sample(ahead, token=5)
    scheduler.update_from_output(first, sample(first, token=9))
    assert stops.status is RequestStatus.FINISHED and stops.output_token_ids == [9]
    updated = scheduler.update_from_output(ahead, sampled)
    assert [r.request_id for r in updated] == ["other"]
    assert stops.output_token_ids == [9]


def test_blocks_fed_ahead_join_the_prefix_cache_once_their_tokens_are_known() -> None:
    scheduler = make_scheduler()
    a = make_request("a", [1, 2, 3])  # its first block fills with the token in flight
    first = _decoding(scheduler, a)
    scheduler.schedule_ahead(max_batch=8)
    assert a.block_hashes == []  # the block's last token is not known yet
    scheduler.update_from_output(first, sample(first, token=9))
    assert len(a.block_hashes) == 1
    twin = make_request("twin", [1, 2, 3, 9, 4])
    assert scheduler.kv.find_cached_blocks(twin) == [a.block_ids[0]]


# ---- the engine, CPU, triton's interpreter ----------------------------------------------
@pytest.fixture(scope="module")
def path(make_checkpoint):
    return make_checkpoint("Glm4ForCausalLM", seed=5, partial_rotary_factor=0.5, head_dim=16)


def _model(path, overlap: bool, **options) -> GLMModel:
    model = padded_model(path, **options)
    model.engine.core.overlap_steps = overlap
    return model


def _record_plans(model: GLMModel) -> list[tuple[bool, list[str]]]:
    """From now on: for each step launched, whether it was planned ahead, and its requests."""
    runner = model.engine.core.runner
    plans: list[tuple[bool, list[str]]] = []
    launch = runner.launch

    def recorded(plan, feed=None):
        plans.append((plan.feeds_pending, [r.request_id for r in plan.requests]))
        return launch(plan, feed)

    runner.launch = recorded
    return plans


def _greedy_jobs(vocab: int, stop_token: int | None) -> list[tuple[list[int], SamplingParams]]:
    """Five greedy requests of 2-12 output tokens, one with a stop token."""
    prompts = random_prompts(vocab, [3, 9, 5, 14, 7], seed=8)
    jobs = []
    for i, prompt in enumerate(prompts):
        stop = [stop_token] if i == 1 and stop_token is not None else []
        params = SamplingParams(
            max_tokens=2 + 5 * (i % 3), temperature=0, ignore_eos=True, stop_token_ids=stop
        )
        jobs.append((prompt, params))
    return jobs


def _greedy(path, overlap: bool, stop_token: int | None = None, **options):
    with _model(path, overlap, max_num_seqs=4, **options) as model:
        plans = _record_plans(model)
        vocab = model.engine.loaded.model.spec.vocab_size
        out = finals(model, _greedy_jobs(vocab, stop_token))
        first, later = prefix_hit_batches(vocab)
        greedy = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
        hits = [r.token_ids for r in model.generate_batch(first, greedy)]
        hits += [r.token_ids for r in model.generate_batch(later, greedy)]
        stats = model.engine.stats()
    tokens = [(r.outputs.token_ids, r.outputs.finish_reason) for r in out]
    return tokens, hits, plans, stats, first + later


@pytest.mark.slow
def test_overlapped_steps_give_the_tokens_of_steps_in_turn_and_of_transformers(path):
    require_triton_interpreter()
    plain, _, _, _, _ = _greedy(path, False)
    stop_token = plain[1][0][3]  # request 1 stops on its 4th token, with a step ahead of it
    expected, expected_hits, in_turn, _, _ = _greedy(path, False, stop_token)
    got, hits, plans, stats, prompts = _greedy(path, True, stop_token)
    assert got == expected and hits == expected_hits
    assert got[1][1] == "stop" and len(got[1][0]) == plain[1][0].index(stop_token) + 1
    assert hits == hf_greedy(path, prompts, 8)
    assert stats.prefix_cache_hits >= 2 * 16
    assert not any(ahead for ahead, _ in in_turn)
    ahead = [ids for is_ahead, ids in plans if is_ahead]
    decodes = [ids for is_ahead, ids in in_turn if len(ids) > 0]
    assert len(ahead) >= len(decodes) // 3, (len(ahead), len(decodes))
    assert len(plans) >= len(in_turn)  # dropped tokens cost steps, never save them


def test_overlapped_steps_survive_preemption(path):
    require_triton_interpreter()
    small = {"kv_cache_memory": 11 * block_bytes(path), "max_num_batched_tokens": 16}
    results = []
    for overlap in (False, True):
        with _model(path, overlap, max_num_seqs=4, **small) as model:
            plans = _record_plans(model)
            first, later = prefix_hit_batches(model.engine.loaded.model.spec.vocab_size)
            greedy = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
            tokens = [r.token_ids for r in model.generate_batch(first + later, greedy)]
            results.append((tokens, model.engine.stats().num_preemptions, plans))
    (in_turn, preempted, _), (overlapped, preempted_too, plans) = results
    assert overlapped == in_turn and preempted > 0 and preempted_too > 0
    assert any(ahead for ahead, _ in plans)


Jobs = list[tuple[list[int], SamplingParams]]


def _in_turn_and_overlapped(path, jobs: Callable[[int], Jobs]):
    """``jobs(vocab)`` run in turn, then overlapped: both runs' final outputs, and the plans
    of the overlapped run."""
    outputs = []
    for overlap in (False, True):
        with _model(path, overlap, max_num_seqs=4) as model:
            plans = _record_plans(model)
            outputs.append(finals(model, jobs(model.engine.loaded.model.spec.vocab_size)))
    return outputs[0], outputs[1], plans


def test_seeded_samples_and_logprobs_are_the_same_when_overlapped(path):
    require_triton_interpreter()

    def jobs(vocab: int) -> Jobs:
        prompts = random_prompts(vocab, [4, 6, 8], seed=3)
        seeded = [
            (p, SamplingParams(max_tokens=7, temperature=0.9, seed=40 + i, logprobs=2))
            for i, p in enumerate(prompts)
        ]
        return [*seeded, (prompts[0], SamplingParams(max_tokens=7, temperature=0, logprobs=3))]

    in_turn, overlapped, plans = _in_turn_and_overlapped(path, jobs)
    assert [(r.outputs.token_ids, r.outputs.logprobs) for r in in_turn] == [
        (r.outputs.token_ids, r.outputs.logprobs) for r in overlapped
    ]
    assert any(ahead for ahead, _ in plans)


def test_penalized_requests_planned_ahead_sample_as_in_turn(path):
    """Steps planned ahead count each request's token in flight in its penalties: greedy with
    a repetition penalty, seeded samples with presence and frequency penalties, and a row
    without any beside them give the tokens and logprobs of steps planned in turn."""
    require_triton_interpreter()

    def jobs(vocab: int) -> Jobs:
        prompts = random_prompts(vocab, [5, 7, 6], seed=6)
        rest = {"max_tokens": 12, "ignore_eos": True, "logprobs": 2}
        return [
            (prompts[0], SamplingParams(temperature=0, repetition_penalty=1.3, **rest)),
            (
                prompts[1],
                SamplingParams(
                    temperature=0.9, seed=5, presence_penalty=0.8, frequency_penalty=0.6, **rest
                ),
            ),
            (prompts[2], SamplingParams(temperature=0, **rest)),
        ]

    in_turn, overlapped, plans = _in_turn_and_overlapped(path, jobs)
    assert [(r.outputs.token_ids, r.outputs.logprobs) for r in in_turn] == [
        (r.outputs.token_ids, r.outputs.logprobs) for r in overlapped
    ]
    penalized = {overlapped[0].request_id, overlapped[1].request_id}
    assert sum(ahead and penalized <= set(ids) for ahead, ids in plans) >= 5


@pytest.mark.slow
def test_structured_requests_planned_ahead_sample_as_in_turn(path):
    """A step planned ahead with grammar rows runs its forward pass at once and samples once
    the tokens before are appended: greedy and seeded requests that follow a JSON schema,
    beside a free one, give the tokens of steps planned in turn, and complete their
    grammar."""
    require_triton_interpreter()

    def jobs(vocab: int) -> Jobs:
        prompts = random_prompts(vocab, [5, 7, 6], seed=9)
        rest = {"max_tokens": 120, "structured_output": PERSON}
        return [
            (prompts[0], SamplingParams(temperature=0, **rest)),
            (prompts[1], SamplingParams(temperature=1.0, seed=4, **rest)),
            (prompts[2], SamplingParams(max_tokens=30, temperature=0, ignore_eos=True)),
        ]

    in_turn, overlapped, plans = _in_turn_and_overlapped(path, jobs)
    assert [r.outputs.token_ids for r in in_turn] == [r.outputs.token_ids for r in overlapped]
    for output in overlapped[:2]:
        assert output.outputs.finish_reason == "stop"
        jsonschema.validate(json.loads(output.outputs.text), PERSON_SCHEMA)
    structured = {overlapped[0].request_id, overlapped[1].request_id}
    assert sum(ahead and structured <= set(ids) for ahead, ids in plans) >= 5


@pytest.mark.slow
def test_prompt_chunks_and_admissions_go_in_steps_planned_ahead(path):
    """With a small token budget and more requests than slots, long prompts are fed in chunks
    beside decodes, and waiting requests are admitted as others finish: steps planned ahead
    carry both, on the eager path, beside tokens in flight. Greedy requests, a seeded one
    with penalties and logprobs, a greedy one with a repetition penalty and one that follows
    a JSON schema give the tokens of steps planned in turn, the plain greedy ones
    transformers'."""
    require_triton_interpreter()
    greedy = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    lengths = [21, 30, 5, 17, 9, 26, 12]
    seeded, penalized, structured = 1, 2, 4  # the others are greedy

    def jobs(vocab: int) -> Jobs:
        params = [greedy] * len(lengths)
        params[seeded] = SamplingParams(
            max_tokens=10,
            temperature=0.8,
            seed=3,
            repetition_penalty=1.2,
            frequency_penalty=2.0,
            logprobs=2,
        )
        params[penalized] = SamplingParams(max_tokens=8, temperature=0, repetition_penalty=1.5)
        params[structured] = SamplingParams(max_tokens=110, temperature=0, structured_output=PERSON)
        return list(zip(random_prompts(vocab, lengths, seed=11), params, strict=True))

    outputs, plans = [], []
    for overlap in (False, True):
        options = {"max_num_seqs": 3, "max_num_batched_tokens": 16, "max_model_len": 128}
        with _model(path, overlap, **options) as model:
            launch, made = model.engine.core.runner.launch, []

            def recorded(plan, feed=None, _launch=launch, _made=made):
                _made.append((plan, [r.request_id for r in plan.requests]))
                return _launch(plan, feed)

            model.engine.core.runner.launch = recorded
            vocab = model.engine.loaded.model.spec.vocab_size
            outputs.append(finals(model, jobs(vocab)))
            plans.append(made)
            assert model.engine.stats().num_steps_ahead == sum(bool(p.pending) for p, _ in made)
    in_turn, overlapped = outputs
    assert [(r.outputs.token_ids, r.outputs.logprobs) for r in in_turn] == [
        (r.outputs.token_ids, r.outputs.logprobs) for r in overlapped
    ]
    assert overlapped[structured].outputs.finish_reason == "stop"
    jsonschema.validate(json.loads(overlapped[structured].outputs.text), PERSON_SCHEMA)
    prompts = random_prompts(vocab, lengths, seed=11)
    plain = [i for i in range(len(lengths)) if i not in (seeded, penalized, structured)]
    assert [overlapped[i].outputs.token_ids for i in plain] == hf_greedy(
        path, [prompts[i] for i in plain], greedy.max_tokens
    )
    assert not any(plan.pending for plan, _ in plans[0])

    def mixed_ahead_with(index: int, *, alone: bool = False) -> int:
        """Steps planned ahead with prompt chunks in which request ``index`` decodes its token
        in flight (``alone``: without the structured request)."""
        rid, grammar = overlapped[index].request_id, overlapped[structured].request_id
        return sum(
            bool(plan.pending)
            and max(plan.num_scheduled_tokens) > 1
            and rid in ids
            and plan.pending[ids.index(rid)]
            and not (alone and grammar in ids)
            for plan, ids in plans[1]
        )

    assert mixed_ahead_with(seeded, alone=True) >= 2
    assert mixed_ahead_with(penalized, alone=True) >= 1
    assert mixed_ahead_with(structured) >= 1
    seen: set[str] = set()
    admitted_ahead = set()
    for plan, ids in plans[1]:
        admitted_ahead |= {i for i in ids if i not in seen and plan.pending}
        seen |= set(ids)
    assert len(admitted_ahead) >= 2, admitted_ahead


def test_a_request_that_arrives_while_a_step_launches_joins_the_step_planned_ahead(path):
    """A request submitted while the engine launches a step (here its first) is admitted in
    the very next step, which is planned ahead all the same."""
    require_triton_interpreter()
    greedy = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    done: queue.Queue = queue.Queue()
    with _model(path, True, max_num_seqs=4) as model:
        prompts = random_prompts(model.engine.loaded.model.spec.vocab_size, [6, 9], seed=21)
        runner = model.engine.core.runner
        launch, plans, late = runner.launch, [], []

        def recorded(plan, feed=None):
            plans.append((bool(plan.pending), [r.request_id for r in plan.requests]))
            step = launch(plan, feed)
            if len(plans) == 1:  # arrives while the engine is between its loop's checks
                late.append(model.engine.submit(prompts[1], greedy, done.put).request_id)
            return step

        runner.launch = recorded
        first = model.engine.submit(prompts[0], greedy, done.put).request_id
        ended = {}
        while len(ended) < 2:
            item = done.get(timeout=120)
            assert not isinstance(item, BaseException), item
            if item.finished:
                ended[item.request_id] = item.outputs.token_ids
    assert plans[0] == (False, [first])
    assert plans[1] == (True, [first, late[0]])  # admitted ahead, beside the token in flight
    assert [ended[first], ended[late[0]]] == hf_greedy(path, prompts, greedy.max_tokens)


def test_a_stop_string_ends_a_request_whose_next_step_is_in_flight(path):
    require_triton_interpreter()
    with _model(path, True) as model:
        plans = _record_plans(model)
        _, cut, _, request = stop_string_run(model)
    assert request.status is RequestStatus.FINISHED
    assert any(ahead for ahead, _ in plans)


def test_a_nan_request_with_a_step_in_flight_fails_alone_and_leaves_no_nan(path):
    """Its logits are NaN from its prefill on, so it fails while the step planned ahead of
    that writes one more (NaN) K/V into its blocks: the scrub, after that step, clears it."""
    require_triton_interpreter()
    with _model(path, True, max_num_seqs=4) as model:
        plans = _record_plans(model)
        _poison_token(model)
        healthy = _healthy_prompts(model, [5, 9, 7], seed=12)
        jobs = [(p, GREEDY) for p in [*healthy, [3, POISON, 8, 1]]]
        results, requests = run_together(model, jobs)
        assert _settled(model)
        for attn in model.engine.loaded.model.attention_layers():
            assert not attn.k_cache.isnan().any() and not attn.v_cache.isnan().any()
        later = _healthy_prompts(model, [11, 6, 8, 4], seed=13)  # reusing the scrubbed blocks
        again = [r.token_ids for r in model.generate_batch(later, GREEDY)]
    failed = results.pop()
    assert isinstance(failed, EngineRequestError) and str(failed).startswith(NON_FINITE)
    assert any(ahead and requests[-1].request_id in ids for ahead, ids in plans)
    assert [r.outputs.token_ids for r in results] == hf_greedy(path, healthy, GREEDY.max_tokens)
    assert again == hf_greedy(path, later, GREEDY.max_tokens)
