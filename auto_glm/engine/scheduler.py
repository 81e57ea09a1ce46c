"""Decides which requests run each step and how many tokens each one feeds."""

from __future__ import annotations

import bisect
import itertools
from collections.abc import Sequence

from auto_glm.engine.config import EngineConfig
from auto_glm.engine.inputs import RequestInputError
from auto_glm.engine.kv_cache_manager import KVCacheManager
from auto_glm.engine.outputs import Prefix
from auto_glm.engine.plan import ModelRunnerOutput, SchedulerOutput
from auto_glm.engine.queue_policy import QueuePolicy, make_policy
from auto_glm.engine.request import FinishReason, Request, RequestStatus

__all__ = ["Scheduler", "check_prompt_length"]


def check_prompt_length(num_prompt: int, max_model_len: int) -> None:
    """Raise :class:`RequestInputError` (``context_length_exceeded``, a ``ValueError``) if
    a prompt of ``num_prompt`` tokens leaves no room to generate within ``max_model_len``
    (shared by local and remote engines)."""
    if num_prompt >= max_model_len:
        raise RequestInputError(
            f"prompt has {num_prompt} tokens but max_model_len is "
            f"{max_model_len}; shorten the prompt or raise max_model_len",
            "context_length_exceeded",
        )


class Scheduler:
    """Continuous batching with chunked prefill, prefix caching and recompute preemption.

    One token budget per step is shared by decodes and prefill chunks. Both queues are
    kept sorted by the queue policy's key (``config.queue_policy``); the policy also picks
    the admission order and the preemption victim, which is never a request already
    scheduled in the same step.

    Requests whose step failed (:meth:`quarantine`) are suspects: they are preempted, and
    each runs again alone, first in precedence order, until it has recomputed the tokens
    of the failed step; nothing else runs meanwhile. A step that fails with one suspect
    alone shows that request at fault.
    """

    def __init__(
        self,
        config: EngineConfig,
        kv_cache_manager: KVCacheManager,
        max_model_len: int,
        policy: QueuePolicy | None = None,
    ) -> None:
        if kv_cache_manager.block_size != config.block_size:
            raise ValueError(
                f"KV cache manager has block_size={kv_cache_manager.block_size} "
                f"but the config says {config.block_size}; build both from one "
                "config"
            )
        self.config = config
        self.kv = kv_cache_manager
        self.max_model_len = max_model_len
        self.policy = policy or make_policy(config.queue_policy)
        self._requests: dict[str, Request] = {}  # every unfinished request by id
        self._waiting: list[Request] = []  # waiting and preempted, sorted by precedence
        self._running: list[Request] = []  # sorted by precedence
        self.num_preemptions_total = 0
        # requests that shared a failed step -> (start, end): the tokens it fed them, which
        # they must compute again alone
        self._suspects: dict[Request, tuple[int, int]] = {}

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    @property
    def num_running(self) -> int:
        return len(self._running)

    @property
    def has_unfinished_requests(self) -> bool:
        return bool(self._requests)

    @property
    def kv_usage(self) -> float:
        return self.kv.usage

    @property
    def prefix_cache_queries(self) -> int:
        return self.kv.prefix_cache_queries

    @property
    def prefix_cache_hits(self) -> int:
        return self.kv.prefix_cache_hits

    def get_request(self, request_id: str) -> Request | None:
        return self._requests.get(request_id)

    def check_prompt_length(self, num_prompt: int) -> None:
        """Raise ``ValueError`` if a prompt of ``num_prompt`` tokens leaves no room to
        generate; any thread may call it."""
        check_prompt_length(num_prompt, self.max_model_len)

    def check_limits(self, request: Request) -> None:
        """Raise ``ValueError`` if ``request`` could never complete. Reads only fixed limits,
        so any thread may call it before submitting."""
        num_prompt = request.num_prompt_tokens
        self.check_prompt_length(num_prompt)
        # The longest the request can grow; its last token is sampled but never fed.
        max_len = min(num_prompt + request.sampling_params.max_tokens, self.max_model_len)
        capacity = self.kv.num_blocks * self.kv.block_size
        # Checked against the whole growth, not just the prompt: a request that outgrows
        # the cache while running alone would preempt itself and never be admitted again.
        if self.kv.blocks_for(max_len - 1) > self.kv.num_blocks:
            raise ValueError(
                f"request may grow to {max_len} tokens ({num_prompt} prompt + "
                f"{max_len - num_prompt} generated) and needs KV for "
                f"{max_len - 1} of them, but the cache holds only {capacity} "
                f"({self.kv.num_blocks} blocks of {self.kv.block_size}); lower "
                "max_tokens or give the KV cache more memory"
            )

    def add_request(self, request: Request) -> None:
        """Queue a request, or raise ``ValueError`` if it could never complete."""
        if request.request_id in self._requests:
            raise ValueError(
                f"request id {request.request_id!r} is already in use; "
                "give each request a unique id"
            )
        if request.status is not RequestStatus.WAITING or request.block_ids:
            raise ValueError(
                f"request {request.request_id!r} was already scheduled "
                f"(status {request.status.value}); submit a fresh Request"
            )
        self.check_limits(request)
        self._requests[request.request_id] = request
        bisect.insort(self._waiting, request, key=self.policy.key)
        self.policy.added(request)

    def is_suspect(self, request: Request) -> bool:
        """Whether ``request`` shared a failed step and has not run alone past it yet."""
        return request in self._suspects

    def quarantine(self, plans: Sequence[SchedulerOutput]) -> list[Request]:
        """Preempt the unfinished requests of ``plans``, steps that failed, as suspects: each
        then runs alone until it has computed again the tokens those steps fed it (see the
        class docstring). Returns them; the caller then calls :meth:`forget_written`."""
        spans: dict[Request, tuple[int, int]] = {}
        for plan in plans:
            for request, start, count in zip(
                plan.requests, plan.start_positions, plan.num_scheduled_tokens, strict=True
            ):
                if request.status is not RequestStatus.RUNNING:
                    continue  # finished since
                # a token in flight (a step planned ahead) was never read back
                end = min(start + count, request.num_tokens)
                if request in spans:  # in both steps: one was planned ahead of the other
                    start, end = min(start, spans[request][0]), max(end, spans[request][1])
                spans[request] = (start, end)
        for request in spans:
            self._running.remove(request)
            self._preempt(request)
        self._suspects.update(spans)
        return list(spans)

    def forget_written(self, plans: Sequence[SchedulerOutput]) -> list[int]:
        """Take the blocks that ``plans``, steps that failed, were to write out of the prefix
        cache, where no request holds them now: they were indexed when planned, but what
        they hold cannot be trusted. Returns those blocks, which the caller should scrub of
        non-finite values."""
        bs = self.kv.block_size
        pool = self.kv.pool
        written = {
            block
            for plan in plans
            for table, start, count in zip(
                plan.block_tables, plan.start_positions, plan.num_scheduled_tokens, strict=True
            )
            for block in table[start // bs : -(-(start + count) // bs)]
        }
        idle = sorted(b for b in written if pool.ref_count(b) == 0)
        pool.forget(idle)
        return idle

    def schedule(self) -> SchedulerOutput:
        """Plan one step and advance ``num_computed_tokens`` of every scheduled request."""
        if self._suspects:
            return self._schedule_suspect()
        kv = self.kv
        budget = self.config.max_num_batched_tokens
        scheduled: list[Request] = []
        counts: list[int] = []
        preempted = self._rebalance()
        running = self._running
        kv_pressure = False

        index = 0
        while index < len(running) and budget > 0:
            request = running[index]
            num_new = min(request.num_tokens - request.num_computed_tokens, budget)
            if num_new <= 0:  # still waiting for its sampled token; nothing to feed
                index += 1
                continue
            while not kv.allocate_slots(request, num_new):
                victim = running.pop(self.policy.victim(running, index))
                self._preempt(victim)
                preempted.append(victim)
                kv_pressure = True
                if victim is request:
                    break
            else:
                scheduled.append(request)
                counts.append(num_new)
                budget -= num_new
                index += 1

        if not kv_pressure:
            self._admit(budget, scheduled, counts, self.config.max_num_seqs)
        return self._plan(scheduled, counts, preempted, [])

    def schedule_ahead(self, max_batch: int) -> SchedulerOutput | None:
        """Plan the next step while the step before still runs, before its tokens are read
        back, or return None (changing nothing) where that could change what runs.

        A running request whose tokens are all fed has its next token in flight: it decodes
        that token, which stays on the device (``SchedulerOutput.pending``), unless it is the
        request's last (``max_tokens`` or ``max_model_len``). One that stops on it (EOS, a stop
        token, its grammar complete) decodes once more, and that token is dropped. The other
        running requests feed their next prompt chunk, and waiting requests are admitted
        with the budget and blocks left, as in :meth:`schedule`. Penalties count the tokens
        in flight on the device, and a step with a grammar row samples once they are
        appended (``LaunchedStep.sample_deferred``).

        None where the running requests' next slots do not fit the free blocks (a step in
        turn preempts), where the policy would hand a waiting request a slot by preempting,
        or where more than ``max_batch`` requests could run. Blocks of tokens in flight are
        indexed for the prefix cache only once those tokens are known
        (:meth:`update_from_output`).
        """
        running = self._running
        max_num_seqs = self.config.max_num_seqs
        if len(running) > max_batch or self._suspects:
            return None
        if (
            self._waiting
            and len(running) >= max_num_seqs
            and self.policy.rebalance_victim(self._waiting, running) is not None
        ):
            return None
        kv = self.kv
        budget = self.config.max_num_batched_tokens
        scheduled: list[Request] = []
        counts: list[int] = []
        pending: list[bool] = []
        new_blocks = 0
        for request in running:
            if budget <= 0:
                break
            computed = request.num_computed_tokens
            in_flight = computed == request.num_tokens
            if not in_flight:
                num_new = min(request.num_tokens - computed, budget)
            elif (
                request.num_output_tokens + 1 >= request.sampling_params.max_tokens
                or request.num_tokens + 1 >= self.max_model_len
            ):
                continue  # the token in flight is its last
            else:
                num_new = 1
            new_blocks += max(0, kv.blocks_for(computed + num_new) - len(request.block_ids))
            scheduled.append(request)
            counts.append(num_new)
            pending.append(in_flight)
            budget -= num_new
        if new_blocks > kv.num_free_blocks:
            return None
        for request, num_new in zip(scheduled, counts, strict=True):
            kv.allocate_slots(request, num_new)
        self._admit(budget, scheduled, counts, min(max_num_seqs, max_batch))
        if not scheduled:
            return None
        pending += [False] * (len(scheduled) - len(pending))
        return self._plan(scheduled, counts, [], pending)

    def _schedule_suspect(self) -> SchedulerOutput:
        """The step of the first suspect in precedence order, alone, fed up to the end of its
        failed step: it fits the blocks it held then, since nothing else has run since."""
        request = next(r for r in (*self._running, *self._waiting) if r in self._suspects)
        kv = self.kv
        start, end = self._suspects[request]
        budget = self.config.max_num_batched_tokens
        if request.status is RequestStatus.RUNNING:  # past its first chunk
            num_new = min(end - request.num_computed_tokens, budget)
            fits = kv.allocate_slots(request, num_new)
        else:  # from its cached prefix up to the failed step, which it computes again
            cached = kv.find_cached_blocks(request)[: start // kv.block_size]
            num_cached = len(cached) * kv.block_size
            num_new = min(end - num_cached, budget)
            fits = kv.admit(request, cached, num_new)
            if fits:
                self._waiting.remove(request)
                self._enter_running(request, num_cached)
        if not fits:
            raise RuntimeError(
                f"{request!r} no longer fits the blocks it held when its step failed"
            )
        return self._plan([request], [num_new], [], [])

    def _plan(
        self,
        scheduled: list[Request],
        counts: list[int],
        preempted: list[Request],
        pending: list[bool],
    ) -> SchedulerOutput:
        """The step of ``scheduled`` feeding ``counts`` tokens each, whose slots are allocated;
        advances their ``num_computed_tokens``."""
        kv = self.kv
        slot_mapping: list[int] = []
        start_positions: list[int] = []
        block_tables: list[Sequence[int]] = []
        for request, num_new in zip(scheduled, counts, strict=True):
            start = request.num_computed_tokens
            start_positions.append(start)
            block_tables.append(Prefix(request.block_ids))  # no copy: O(1) at any length
            kv.append_slots(request, start, num_new, slot_mapping)
        # Advance only after the whole plan exists, so that no request admitted in this
        # step can hit blocks whose K/V are written by this same step. A token in flight is
        # not known yet: its block is indexed once it is (update_from_output).
        in_flight = pending or itertools.repeat(False)
        for request, num_new, ahead in zip(scheduled, counts, in_flight, strict=False):
            request.num_computed_tokens += num_new
            if not ahead:
                kv.cache_full_blocks(request)
            self.policy.charge(request, num_new)
        return SchedulerOutput(
            scheduled, counts, start_positions, block_tables, slot_mapping, preempted, pending
        )

    def update_from_output(
        self, plan: SchedulerOutput, runner_output: ModelRunnerOutput
    ) -> list[Request]:
        """Append each sampled token and finish requests that hit a stop condition (a
        structured-output request also stops once its grammar is complete).

        ``plan`` is the step that produced ``runner_output``. Returns the requests that got
        a token, finished or not; ids aborted since the plan was made are skipped.
        """
        updated: list[Request] = []
        any_finished = False
        requests = self._requests
        max_model_len = self.max_model_len
        for request_id, token_id in zip(
            runner_output.request_ids, runner_output.sampled_token_ids, strict=True
        ):
            request = requests.get(request_id)
            if request is None or request.status is not RequestStatus.RUNNING:
                continue
            request.append_output_token(token_id)
            updated.append(request)
            params = request.sampling_params
            grammar = request.grammar
            if grammar is not None and not grammar.accept(token_id):
                request.error = (
                    f"structured output failed: its grammar rejected token {token_id} "
                    f"({grammar.error}); simplify the schema"
                )
                request.error_code = "invalid_schema"
                reason = FinishReason.ABORT
            elif (
                (token_id in request.eos_token_ids and not params.ignore_eos)
                or token_id in params.stop_token_ids
                or (grammar is not None and grammar.is_complete)
            ):
                reason = FinishReason.STOP
            elif (
                request.num_output_tokens >= params.max_tokens
                or request.num_tokens >= max_model_len
            ):
                reason = FinishReason.LENGTH
            else:
                if request.num_computed_tokens == request.num_tokens:  # planned ahead
                    self.kv.cache_full_blocks(request)
                continue
            self._release(request, reason)
            any_finished = True
        if any_finished:  # one pass instead of a list.remove per finished request
            self._running = [r for r in self._running if r.status is RequestStatus.RUNNING]
        if self._suspects:  # those that ran alone past their failed step are cleared
            for request in plan.requests:
                span = self._suspects.get(request)
                if span is not None and span[1] <= request.num_computed_tokens:
                    del self._suspects[request]
        return updated

    def finish_request(self, request_id: str, reason: FinishReason) -> Request | None:
        """Finish a request in any state and free what it holds.

        Returns None for an unknown or already finished id, so repeated calls are harmless.
        """
        request = self._requests.get(request_id)
        if request is None:
            return None
        if request.status is RequestStatus.RUNNING:
            self._running.remove(request)
        else:
            self._waiting.remove(request)
        self._release(request, reason)
        return request

    def abort_request(self, request_id: str) -> Request | None:
        return self.finish_request(request_id, FinishReason.ABORT)

    def _rebalance(self) -> list[Request]:
        """With every batch slot taken, let the policy hand one to a waiting request (at
        most one preemption a step); returns the preempted request, if any."""
        if not self._waiting or len(self._running) < self.config.max_num_seqs:
            return []
        index = self.policy.rebalance_victim(self._waiting, self._running)
        if index is None:
            return []
        victim = self._running.pop(index)
        self._preempt(victim)
        return [victim]

    def _admit(
        self, budget: int, scheduled: list[Request], counts: list[int], max_num_seqs: int
    ) -> None:
        """Move waiting requests to running, in the policy's order, until one does not fit or
        ``max_num_seqs`` run."""
        kv = self.kv
        admitted: list[Request] = []
        for request in self.policy.admission_order(self._waiting, self._running):
            if budget <= 0 or len(self._running) >= max_num_seqs:
                break
            cached_blocks = kv.find_cached_blocks(request)
            num_cached = len(cached_blocks) * kv.block_size
            num_new = min(request.num_tokens - num_cached, budget)
            if not kv.admit(request, cached_blocks, num_new):
                break  # head-of-line: later requests must not overtake this one
            self._enter_running(request, num_cached)
            scheduled.append(request)
            counts.append(num_new)
            budget -= num_new
            admitted.append(request)
        if admitted:
            self._waiting = [r for r in self._waiting if r.status is not RequestStatus.RUNNING]

    def _enter_running(self, request: Request, num_cached: int) -> None:
        """Move an admitted request (its blocks given) to the running list; the caller takes
        it out of the waiting one."""
        request.num_computed_tokens = num_cached
        if request.status is RequestStatus.WAITING:
            request.num_cached_tokens = num_cached
        request.status = RequestStatus.RUNNING
        bisect.insort(self._running, request, key=self.policy.key)

    def _preempt(self, request: Request) -> None:
        """Drop the request's K/V and requeue it; it is recomputed on re-admission."""
        self.kv.free(request)
        request.status = RequestStatus.PREEMPTED
        request.num_computed_tokens = 0
        request.num_preemptions += 1
        self.num_preemptions_total += 1
        bisect.insort(self._waiting, request, key=self.policy.key)

    def _release(self, request: Request, reason: FinishReason) -> None:
        """Mark finished and free the blocks; the caller removes it from its queue."""
        self.kv.free(request)
        request.status = RequestStatus.FINISHED
        request.finish_reason = reason
        del self._requests[request.request_id]
        self._suspects.pop(request, None)
        self.policy.finished(request)
