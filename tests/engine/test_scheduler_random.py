"""Random workloads through the scheduler as the engine loop drives it, with no model: each
step is planned in turn, or (overlap on, as on a GPU) ahead where
:meth:`Scheduler.schedule_ahead` allows, while the step before is "in flight"; requests
arrive and are aborted between launches, and the small cache forces preemptions.

A simulated device runs each step as it is launched: it reads every position before the
fed ones through the step's block table and checks that the slot holds exactly that
request's prefix (under its cache salt), then writes the fed positions. A token in flight
is taken from the step before's samples, as the GPU gathers it. Each request's tokens are
fixed in advance, so whatever the schedule, every request must end with exactly its own
tokens up to its stop, and the cache must drain.

With faults on, some launches fail as the model runner's can (a poisoned request in the
step, or at random): the device writes garbage to part of what the step feeds and raises,
and the driver hands the step to the scheduler as the engine loop does (its requests rerun
alone; one that fails alone ends). The device's reads then prove that no request is ever
served what a failed step wrote.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import pytest

from auto_glm import SamplingParams
from auto_glm.engine.config import EngineConfig
from auto_glm.engine.kv_cache_manager import KVCacheManager
from auto_glm.engine.plan import ModelRunnerOutput, SchedulerOutput
from auto_glm.engine.request import FinishReason, Request, RequestStatus
from auto_glm.engine.scheduler import Scheduler

BS = 4
EOS = 49


@dataclass
class Counts:
    """What the run went through, so that a test can require each case to happen."""

    steps: int = 0
    ahead: int = 0
    ahead_with_chunks: int = 0
    admitted_ahead: int = 0
    dropped: int = 0  # tokens sampled in a step ahead for a request that stopped before
    aborted: int = 0
    preemptions: int = 0
    prefix_hits: int = 0
    failed_steps: int = 0
    failed_ahead: int = 0  # of which steps planned ahead
    culprits: int = 0  # requests ended by a step that failed with them alone


class StepFault(RuntimeError):
    """A launch that failed, as a model runner's can."""


class Device:
    """The KV cache as slot -> (cache salt, the token ids up to and including that position),
    and each request's tokens, fixed in advance. ``poisoned`` requests fail every step they
    are in; any step fails with probability ``fault_rate``."""

    def __init__(
        self,
        truth: dict[str, list[int]],
        max_model_len: int,
        rng: random.Random,
        poisoned: set[str] = frozenset(),
        fault_rate: float = 0.0,
    ) -> None:
        self.truth, self.max_model_len = truth, max_model_len
        self.memory: dict[int, tuple[str | None, tuple[int, ...]]] = {}
        self.rng, self.poisoned, self.fault_rate = rng, poisoned, fault_rate

    def launch(self, plan: SchedulerOutput, before: ModelRunnerOutput | None) -> ModelRunnerOutput:
        """Run ``plan``: check what it reads, write what it feeds, and sample the rows that
        reach their end. ``before`` is the step in flight, whose samples feed pending rows."""
        in_flight = {}
        if before is not None:
            in_flight = dict(zip(before.request_ids, before.sampled_token_ids, strict=True))
        fails = any(r.request_id in self.poisoned for r in plan.requests) or (
            self.rng.random() < self.fault_rate
        )
        pending = plan.pending or [False] * len(plan.requests)
        ids, tokens, offset = [], [], 0
        for request, n, start, table, ahead in zip(
            plan.requests,
            plan.num_scheduled_tokens,
            plan.start_positions,
            plan.block_tables,
            pending,
            strict=True,
        ):
            rid = request.request_id
            truth = self.truth[rid]
            slots = [table[p // BS] * BS + p % BS for p in range(start + n)]
            assert plan.slot_mapping[offset : offset + n] == slots[start:], rid
            offset += n
            # a request's last token is sampled, never fed: feeding it is a wasted row
            last = min(
                request.num_prompt_tokens + request.sampling_params.max_tokens, self.max_model_len
            )
            assert start + n < last, f"{rid} feeds its last token (position {last - 1})"
            for p in range(start):
                assert self.memory.get(slots[p]) == (request.cache_salt, tuple(truth[: p + 1])), (
                    f"{rid} reads position {p} from slot {slots[p]}"
                )
            if ahead:
                assert n == 1 and start == request.num_tokens, rid
                assert in_flight[rid] == truth[start], rid  # the token gathered on the device
            else:
                assert request.all_token_ids[start : start + n] == truth[start : start + n], rid
            for p in range(start, start + n):
                written = (request.cache_salt, tuple(truth[: p + 1]))
                if fails and self.rng.random() < 0.5:  # a failed step leaves part undone
                    written = ("garbage", ())
                self.memory[slots[p]] = written
            if start + n == request.num_tokens + ahead:
                ids.append(rid)
                tokens.append(truth[start + n])
        if fails:
            raise StepFault
        return ModelRunnerOutput(ids, tokens)


def _request(rng: random.Random, i: int, shared: list[int], policy: str) -> tuple[Request, list]:
    """A request with a prompt that may share a prefix, and its whole token sequence."""
    prompt = shared[: rng.randrange(len(shared) + 1)] + [
        rng.randrange(1, EOS) for _ in range(rng.randrange(1, 14))
    ]
    outputs = [rng.randrange(1, EOS + 1) for _ in range(40)]  # EOS (49) stops some early
    request = Request(
        f"r{i}",
        prompt,
        SamplingParams(max_tokens=rng.randrange(1, 12)),
        eos_token_ids=frozenset({EOS}) if i % 3 else frozenset(),
        priority=rng.randrange(2) if policy == "priority" else 0,
        cache_salt="s" if i % 5 == 0 else None,
        arrival_time=float(i),
        tenant=f"t{i % 3}" if policy == "fair" else None,
    )
    return request, prompt + outputs


def _expected(request: Request, truth: list[int], max_model_len: int) -> tuple[list, FinishReason]:
    """The tokens ``request`` must end with, and why it stops."""
    prompt = request.num_prompt_tokens
    out = []
    for token in truth[prompt:]:
        out.append(token)
        if token in request.eos_token_ids:
            return out, FinishReason.STOP
        if len(out) >= request.sampling_params.max_tokens or prompt + len(out) >= max_model_len:
            return out, FinishReason.LENGTH
    raise AssertionError("truth too short")


def run_workload(
    seed: int, policy: str, overlap: bool, num_requests: int = 40, faults: bool = False
) -> Counts:
    """Drive a scheduler as ``EngineCore.step`` does, planning ahead with ``overlap``; checks
    every step's limits and every request's end, and returns what happened. With ``faults``,
    some launches fail (see the module docstring)."""
    rng = random.Random(seed)
    max_model_len = 28
    config = EngineConfig(
        block_size=BS,
        max_num_seqs=rng.choice([3, 4, 6]),
        max_num_batched_tokens=rng.choice([6, 9, 16]),
        queue_policy=policy,
    )
    scheduler = Scheduler(config, KVCacheManager(14, BS, True), max_model_len)
    max_batch = config.max_num_seqs - rng.randrange(2)  # the runner's limit may be lower
    if not overlap:
        max_batch = 0  # as a runner without the padded decode path: nothing goes ahead
    shared = [rng.randrange(1, EOS) for _ in range(9)]
    truth: dict[str, list[int]] = {}
    added: list[Request] = []
    aborted: set[str] = set()
    poisoned = {f"r{i}" for i in range(num_requests) if faults and i % 13 == 7}
    device = Device(truth, max_model_len, rng, poisoned, 0.03 if faults else 0.0)
    counts = Counts()
    failed: set[str] = set()

    def fail(plans: list[SchedulerOutput]) -> None:
        """What EngineCore._fail_step does with steps whose launch failed."""
        counts.failed_steps += 1
        [first, *more] = plans
        if not more and len(first.requests) == 1 and scheduler.is_suspect(first.requests[0]):
            culprit = first.requests[0]
            scheduler.finish_request(culprit.request_id, FinishReason.ABORT)
            failed.add(culprit.request_id)
            counts.culprits += 1
        else:
            scheduler.quarantine(plans)
        scheduler.forget_written(plans)

    def commands() -> None:
        """Arrivals and aborts, as the engine applies them between launches."""
        if len(added) < num_requests and rng.random() < 0.5:
            for _ in range(rng.randrange(1, 4)):
                request, tokens = _request(rng, len(added), shared, policy)
                truth[request.request_id] = tokens
                scheduler.add_request(request)
                added.append(request)
        live = [r for r in added if not r.is_finished]
        if live and rng.random() < 0.03:
            victim = rng.choice(live)
            scheduler.abort_request(victim.request_id)
            aborted.add(victim.request_id)

    in_flight: tuple[SchedulerOutput, ModelRunnerOutput] | None = None
    for _ in range(5000):
        done = len(added) >= num_requests and not scheduler.has_unfinished_requests
        if done and in_flight is None:  # a step in flight is read back even with no one left
            break
        commands()
        if in_flight is not None:
            plan, sampled = in_flight
            in_flight = None
        else:
            plan = scheduler.schedule()
            if plan.is_empty:
                continue
            if any(scheduler.is_suspect(r) for r in added if not r.is_finished):
                assert len(plan.requests) == 1 and scheduler.is_suspect(plan.requests[0])
            try:
                sampled = device.launch(plan, None)
            except StepFault:
                fail([plan])
                continue
        assert plan.total_tokens <= config.max_num_batched_tokens
        assert len(plan.requests) <= config.max_num_seqs
        commands()  # those that came during the launch
        waiting = {r.request_id for r in added if r.status is not RequestStatus.RUNNING}
        ahead = scheduler.schedule_ahead(max_batch)
        if ahead is not None:
            assert len(ahead.requests) <= max_batch
            assert ahead.total_tokens <= config.max_num_batched_tokens
            try:
                in_flight = (ahead, device.launch(ahead, sampled))
            except StepFault:  # the step before is not read back: both rerun
                fail([plan, ahead])
                counts.failed_ahead += 1
                continue
            counts.ahead += 1
            counts.ahead_with_chunks += any(n > 1 for n in ahead.num_scheduled_tokens)
            counts.admitted_ahead += sum(r.request_id in waiting for r in ahead.requests)
        stopped = {r.request_id for r in added if r.is_finished}
        scheduler.update_from_output(plan, sampled)
        counts.steps += 1
        if in_flight is not None:
            counts.dropped += sum(
                r.request_id not in stopped and r.is_finished for r in in_flight[0].requests
            )
    else:
        pytest.fail("the workload did not drain in 5000 steps")

    counts.aborted = len(aborted)
    counts.preemptions = scheduler.num_preemptions_total
    counts.prefix_hits = scheduler.prefix_cache_hits
    for request in added:
        rid = request.request_id
        assert request.is_finished, rid
        if rid in aborted or rid in failed:
            assert request.finish_reason is FinishReason.ABORT, rid
            want, _ = _expected(request, truth[rid], max_model_len)
            assert request.output_token_ids == want[: request.num_output_tokens], rid
            continue
        assert rid not in poisoned, f"{rid} is poisoned, yet it ended"
        want, reason = _expected(request, truth[rid], max_model_len)
        assert (request.output_token_ids, request.finish_reason) == (want, reason), rid
    assert scheduler.kv_usage == 0.0 and scheduler.kv.num_free_blocks == 14
    assert sum(r.num_preemptions for r in added) == scheduler.num_preemptions_total
    return counts


@pytest.mark.parametrize("overlap", [False, True], ids=["in-turn", "ahead"])
@pytest.mark.parametrize("policy", ["fcfs", "priority", "fair"])
def test_random_workloads_end_with_each_requests_own_tokens(policy: str, overlap: bool) -> None:
    total = Counts()
    for seed in range(12):
        counts = run_workload(seed, policy, overlap)
        for name in vars(total):
            setattr(total, name, getattr(total, name) + getattr(counts, name))
    # every case must have happened, or the run proves little
    assert total.aborted and total.preemptions and total.prefix_hits, total
    if not overlap:
        assert total.ahead == 0, total
        return
    assert total.ahead > total.steps // 2, total
    assert total.ahead_with_chunks and total.admitted_ahead and total.dropped, total


@pytest.mark.parametrize("overlap", [False, True], ids=["in-turn", "ahead"])
@pytest.mark.parametrize("policy", ["fcfs", "priority", "fair"])
def test_failed_steps_rerun_their_requests_alone_and_serve_nothing_they_wrote(
    policy: str, overlap: bool
) -> None:
    total = Counts()
    for seed in range(12):
        counts = run_workload(seed, policy, overlap, faults=True)
        for name in vars(total):
            setattr(total, name, getattr(total, name) + getattr(counts, name))
    assert total.failed_steps > total.culprits > 0 and total.preemptions, total
    assert total.prefix_hits, total
    if overlap:
        assert total.failed_ahead and total.ahead, total
