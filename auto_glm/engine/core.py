"""The engine loop: one thread that schedules, runs the model and publishes deltas.

It never tokenizes or detokenizes: requests arrive as token ids through a command queue and
leave as token-id deltas through the ``publish`` callback, which must be cheap (it hands the
batch to the output thread).

On a device that runs asynchronously (a GPU: :attr:`EngineCore.defer_outputs`), a step's
deltas are held until the next step's forward pass has been launched
(:attr:`ModelRunner.after_launch`), or until the loop has nothing more to run: the output
thread then detokenizes them while the loop waits for the device, instead of competing with
the loop for the GIL while it schedules and launches the next step. A stop string is then
seen one step later, so the engine samples one more token for that request, which nobody
receives.

There too, with the padded decode path (:attr:`EngineCore.overlap_steps`), the loop plans
and launches the next step before it reads back the tokens of the one running
(:meth:`Scheduler.schedule_ahead`): the device feeds them to it itself, and the host
schedules, fills the inputs and launches while the device computes, instead of the device
waiting for the host between steps. Prompt chunks and admissions go in such a step too,
from what the host knows, with the requests and aborts that came while the step before was
launched. It does so only where the tokens stay the same: a request that
stops on the token being read back decodes once more, and that token is dropped. A
grammar masks each token from those before it, on the host, so a step planned ahead with a
grammar row launches its forward pass only, and its sampling once the tokens read back are
applied.

A step that the model runner fails (an exception: out of memory, a kernel's error) does not
stop the loop: its requests run again, each alone, and only one that fails alone ends, with
an error; several failed steps in a row, which point at the device, stop it
(:data:`MAX_FAILED_STEPS`).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from auto_glm.engine.config import EngineConfig
from auto_glm.engine.kv_cache_manager import KVCacheManager
from auto_glm.engine.model_runner import (
    LaunchedStep,
    ModelRunner,
    StepOutput,
    non_finite_logits_message,
)
from auto_glm.engine.outputs import EngineCoreOutput
from auto_glm.engine.plan import SchedulerOutput
from auto_glm.engine.request import FinishReason, Request
from auto_glm.engine.scheduler import Scheduler

__all__ = ["MAX_FAILED_STEPS", "EngineCore", "EngineDeadError", "EngineStats"]

log = logging.getLogger("auto_glm.engine")

T = TypeVar("T")

# Failed steps in a row (none succeeding between; a suspect's step alone does not count)
# after which the loop stops: the device, not a request, is then at fault, and the server
# must say it is dead.
MAX_FAILED_STEPS = 3


class EngineDeadError(RuntimeError):
    """The engine loop stopped on an error; the server must be restarted."""


@dataclass
class EngineStats:
    num_running: int
    num_waiting: int
    kv_usage: float  # 0..1
    num_preemptions: int
    prefix_cache_queries: int  # tokens
    prefix_cache_hits: int  # tokens
    num_steps: int
    num_steps_ahead: int  # of which launched before the step before was read back
    step_time: float  # seconds spent in steps, total
    model_time: float  # of which inside the model runner
    forward_time: float  # of which inside the model's forward (the rest is overhead)
    wait_time: float = 0.0  # of which waiting for the device's sampled tokens
    num_failed_steps: int = 0  # steps the model runner failed (their requests ran again alone)


class EngineCore:
    def __init__(
        self,
        runner: ModelRunner,
        config: EngineConfig,
        max_model_len: int,
        publish: Callable[[list[EngineCoreOutput]], None],
    ) -> None:
        self.runner = runner
        self.kv = KVCacheManager(runner.num_blocks, config.block_size, config.enable_prefix_caching)
        self.scheduler = Scheduler(config, self.kv, max_model_len)
        self.max_model_len = max_model_len
        self._publish = publish
        self._commands: deque[tuple[str, object]] = deque()
        self._wake = threading.Condition()
        self._stopping = False
        self.error: BaseException | None = None
        self._live: dict[str, Request] = {}  # accepted by the loop, not yet finished
        self._held: list[EngineCoreOutput] = []  # deltas not yet published (see above)
        runner.after_launch = self._publish_held
        # hold each step's deltas until the next launch (read by the loop every step)
        self.defer_outputs = runner.platform.runs_async
        # plan and launch decode steps ahead of reading back the step before (read every step)
        self.overlap_steps = runner.platform.runs_async and runner.decode_graphs is not None
        self._in_flight: tuple[SchedulerOutput, LaunchedStep] | None = None  # planned ahead
        self.num_steps = 0
        self.num_steps_ahead = 0
        self.num_failed_steps = 0
        self._failed_in_a_row = 0  # reset by each step whose tokens are read back
        self.step_time = 0.0
        self.model_time = 0.0
        self._thread = threading.Thread(target=self._run, name="autoglm-engine", daemon=True)

    # ---- called from any thread -------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    @property
    def is_alive(self) -> bool:
        return self._thread.is_alive() and self.error is None

    @property
    def death_message(self) -> str:
        """What stopped the loop, for the requests it fails (empty while it runs)."""
        exc = self.error
        if exc is None:
            return ""
        if isinstance(exc, EngineDeadError):  # it says what to do
            return f"the engine loop stopped: {exc}"
        return f"the engine loop stopped on {type(exc).__name__}: {exc}; restart the server"

    def check_request(self, request: Request) -> None:
        """Raise ValueError now if ``request`` could never run (limits are fixed at start)."""
        self.scheduler.check_limits(request)

    def add_request(self, request: Request) -> None:
        if self.error is not None:
            raise EngineDeadError(self.death_message)
        self.check_request(request)
        self._command("add", request)

    def finish_request(self, request_id: str, reason: FinishReason = FinishReason.ABORT) -> None:
        self._command("finish", (request_id, reason))

    def stats(self) -> EngineStats:
        s = self.scheduler
        return EngineStats(
            s.num_running,
            s.num_waiting,
            s.kv_usage,
            s.num_preemptions_total,
            s.prefix_cache_queries,
            s.prefix_cache_hits,
            self.num_steps,
            self.num_steps_ahead,
            self.step_time,
            self.model_time,
            self.runner.forward_time,
            self.runner.wait_time,
            self.num_failed_steps,
        )

    def shutdown(self) -> None:
        with self._wake:
            self._stopping = True
            self._wake.notify()
        if self._thread.is_alive():
            self._thread.join(timeout=30)
        if not self._thread.is_alive():  # a loop still in its step keeps what it runs
            self.runner.close()

    def _command(self, kind: str, arg: object) -> None:
        with self._wake:
            self._commands.append((kind, arg))
            self._wake.notify()

    # ---- the loop thread --------------------------------------------------------------
    def _has_work(self) -> bool:
        return bool(
            self._commands
            or self._stopping
            or self.scheduler.has_unfinished_requests
            or self._in_flight is not None
        )

    def _publish_held(self) -> None:
        if self._held:
            held, self._held = self._held, []
            self._publish(held)

    def _run(self) -> None:
        with self.runner.platform.on_device():  # this thread's kernels go to the engine's
            self._loop()

    def _loop(self) -> None:
        try:
            while True:
                with self._wake:
                    if not self._has_work():  # nothing to launch next: deliver what is held
                        self._publish_held()
                    while not self._has_work():
                        self._wake.wait()
                    if self._stopping:
                        break
                    commands = self._take_commands()
                self._held.extend(self._apply(commands))
                if self.scheduler.has_unfinished_requests or self._in_flight is not None:
                    produced = self.step()  # publishes the held deltas as it launches
                    self._held.extend(produced)
                if not self.defer_outputs:
                    self._publish_held()
            if self._in_flight is not None:  # let the device finish what it was given
                self._in_flight[1].result()
            self._publish_held()
        except BaseException as exc:  # the loop must never die silently: fail every request
            log.exception("engine loop died")
            self.error = exc
            try:
                self._publish_held()  # what the last steps produced still reaches its streams
            finally:
                self._fail_all()

    def _take_commands(self) -> list[tuple[str, object]]:
        """The commands queued so far, in order, leaving none (the caller holds ``_wake``)."""
        commands = list(self._commands)
        self._commands.clear()
        return commands

    def _apply(self, commands: list[tuple[str, object]]) -> list[EngineCoreOutput]:
        outputs = []
        for kind, arg in commands:
            if kind == "add":
                request = arg
                try:
                    self.scheduler.add_request(request)
                except ValueError as exc:
                    outputs.append(
                        EngineCoreOutput(
                            request.request_id, [], [], FinishReason.ABORT, error=str(exc)
                        )
                    )
                    continue
                self._live[request.request_id] = request
            else:
                request_id, reason = arg
                request = self.scheduler.finish_request(request_id, reason)
                if request is not None:
                    outputs.append(self._finished_output(request, [], []))
        return outputs

    def step(self) -> list[EngineCoreOutput]:
        """One scheduling + forward + sampling step; returns the deltas it produced. With
        :attr:`overlap_steps`, the step may launch the next one before it reads its tokens
        back; the next call then finishes that one.

        Where the model runner raises, the requests of the steps it ran are run again, each
        alone, to find the one at fault (:meth:`_fail_step`)."""
        outputs: list[EngineCoreOutput] = []
        try:
            self._step(outputs)
        except _StepFailed as failed:
            outputs.extend(self._fail_step(failed.plans, failed.__cause__))
        return outputs

    def _step(self, outputs: list[EngineCoreOutput]) -> None:
        t0 = time.perf_counter()
        if self._in_flight is not None:
            plan, launched = self._in_flight
            self._in_flight = None
        else:
            plan = self.scheduler.schedule()
            if plan.is_empty:
                self._publish_held()  # no launch will publish them
                return
            _mark_scheduled(plan)
            t1 = time.perf_counter()
            if not self.overlap_steps:
                result = _on_device([plan], self.runner.execute, plan)
                self.model_time += time.perf_counter() - t1
                outputs.extend(self._outputs(plan, result, t0))
                return
            launched = _on_device([plan], self.runner.launch, plan)
            self.model_time += time.perf_counter() - t1
        t1 = time.perf_counter()
        ran = [plan]
        if self.overlap_steps:
            with self._wake:  # those that came during this step first: they change the plan
                commands = self._take_commands()
            self._held.extend(self._apply(commands))  # delivered with this step's deltas
            ahead = self.scheduler.schedule_ahead(self.runner.max_ahead_batch)
            if ahead is not None:
                _mark_scheduled(ahead)
                ran.append(ahead)
                self._in_flight = (ahead, _on_device(ran, self.runner.launch, ahead, launched))
                self.num_steps_ahead += 1
        result = _on_device(ran, launched.result)
        self.model_time += time.perf_counter() - t1
        outputs.extend(self._outputs(plan, result, t0))
        if self._in_flight is not None:  # its grammars have taken this step's tokens now
            t2 = time.perf_counter()
            _on_device(ran[1:], self._in_flight[1].sample_deferred)
            held_back = time.perf_counter() - t2  # in the model runner, within this call
            self.model_time += held_back
            self.step_time += held_back

    def _fail_step(
        self, plans: list[SchedulerOutput], exc: BaseException
    ) -> list[EngineCoreOutput]:
        """Handle ``plans``, steps that the model runner failed: their requests run again,
        each alone (:meth:`Scheduler.quarantine`), and one whose step fails alone ends with
        an error. :data:`MAX_FAILED_STEPS` other failed steps in a row, with no step between
        that succeeded, point at the device rather than at a request: the loop then stops
        (:class:`EngineDeadError`), so that the server reports itself dead.

        The K/V that the failed steps were to write cannot be trusted: the blocks left idle
        are taken out of the prefix cache (:meth:`Scheduler.forget_written`) and scrubbed."""
        self._in_flight = None
        self.num_failed_steps += 1
        scheduler = self.scheduler
        [plan, *more] = plans
        if not more and len(plan.requests) == 1 and scheduler.is_suspect(plan.requests[0]):
            log.error("a request failed alone: ending it", exc_info=exc)
            error = (
                f"the engine failed this request: its step raised {type(exc).__name__}: {exc}, "
                "also when the request ran alone (the requests that shared the step ran on); "
                "see the server log"
            )
            outputs, _ = self._end_with_error([plan.requests[0].request_id], error)
        else:
            self._failed_in_a_row += 1
            if self._failed_in_a_row >= MAX_FAILED_STEPS:
                raise EngineDeadError(
                    f"{self._failed_in_a_row} engine steps in a row failed, the last with "
                    f"{exc!r}; the device, not a request, is at fault: restart the server"
                ) from exc
            suspects = scheduler.quarantine(plans)
            log.error(
                "an engine step failed: running its %d requests again, one at a time",
                len(suspects),
                exc_info=exc,
            )
            outputs = []
        self.runner.scrub_blocks(scheduler.forget_written(plans))
        return outputs

    def _outputs(
        self, plan: SchedulerOutput, result: StepOutput, t0: float
    ) -> list[EngineCoreOutput]:
        """Apply ``plan``'s sampled tokens; the deltas they make."""
        self._failed_in_a_row = 0
        updated = self.scheduler.update_from_output(plan, result)
        logprobs = dict(zip(result.request_ids, result.logprobs, strict=False))
        now = time.monotonic()
        outputs = self._fail_non_finite(result.failed) if result.failed else []
        for request in updated:
            if request.metrics.first_token_time is None:
                request.metrics.first_token_time = now
            token, lp = request.output_token_ids[-1], logprobs.get(request.request_id)
            if request.is_finished:
                outputs.append(self._finished_output(request, [token], [lp]))
            else:
                outputs.append(EngineCoreOutput(request.request_id, [token], [lp]))
        self.num_steps += 1
        self.step_time += time.perf_counter() - t0
        return outputs

    def _fail_non_finite(self, request_ids: list[str]) -> list[EngineCoreOutput]:
        """End the requests whose logits were not finite with an error and free their
        blocks; the rest of the batch runs on.

        Their blocks may hold NaN K/V, which would poison whichever request reuses them, so
        the blocks no one else holds are scrubbed, and those that held NaN are taken out of
        the prefix cache, since their scrubbed content no longer matches their hash.
        """
        outputs, blocks = self._end_with_error(
            request_ids, non_finite_logits_message(self.runner.dtype)
        )
        idle = sorted(b for b in blocks if self.kv.pool.ref_count(b) == 0)
        self.kv.pool.forget(self.runner.scrub_blocks(idle))
        return outputs

    def _end_with_error(
        self, request_ids: list[str], error: str
    ) -> tuple[list[EngineCoreOutput], set[int]]:
        """Abort these requests (those still unfinished) with ``error``; their final
        outputs, and the blocks they held."""
        outputs, blocks = [], set()
        for request_id in request_ids:
            request = self.scheduler.get_request(request_id)
            if request is None:
                continue
            blocks.update(request.block_ids)
            self.scheduler.finish_request(request_id, FinishReason.ABORT)
            output = self._finished_output(request, [], [])
            output.error = error
            outputs.append(output)
        return outputs, blocks

    def _finished_output(self, request: Request, tokens: list[int], lps: list) -> EngineCoreOutput:
        self._live.pop(request.request_id, None)
        request.metrics.finished_time = time.monotonic()
        request.metrics.num_preemptions = request.num_preemptions
        return EngineCoreOutput(
            request.request_id,
            tokens,
            lps,
            request.finish_reason,
            error=request.error,
            error_code=request.error_code,
        )

    def _fail_all(self) -> None:
        ids = list(self._live)
        ids.extend(r.request_id for kind, r in self._commands if kind == "add")
        self._publish(
            [EngineCoreOutput(i, [], [], FinishReason.ABORT, error=self.death_message) for i in ids]
        )


class _StepFailed(Exception):
    """The model runner raised while running ``plans`` (the error is the ``__cause__``)."""

    def __init__(self, plans: list[SchedulerOutput]) -> None:
        super().__init__()
        self.plans = plans


def _on_device(plans: list[SchedulerOutput], call: Callable[..., T], *args: object) -> T:
    """``call(*args)``, a model runner call for ``plans``; what it raises (an Exception) is
    raised again as :class:`_StepFailed`, for :meth:`EngineCore._fail_step`."""
    try:
        return call(*args)
    except Exception as exc:
        raise _StepFailed(plans) from exc


def _mark_scheduled(plan: SchedulerOutput) -> None:
    """Note when each of ``plan``'s requests was first scheduled."""
    now = time.monotonic()
    for request in plan.requests:
        if request.metrics.first_scheduled_time is None:
            request.metrics.first_scheduled_time = now
