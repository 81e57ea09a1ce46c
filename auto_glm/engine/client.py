"""The caller's side of the engine: tokenize, submit, detokenize, deliver.

Detokenization and stop strings run on an output thread, never on the loop thread. Each
request has a sink (a callable) that receives its :class:`RequestOutput` updates, or an
exception when the engine fails it; the async and sync fronts plug in their own sinks.
"""

from __future__ import annotations

import itertools
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from auto_glm.engine.config import EngineConfig
from auto_glm.engine.core import EngineCore, EngineDeadError, EngineStats
from auto_glm.engine.model_runner import ModelRunner
from auto_glm.engine.output_processor import RequestOutputProcessor
from auto_glm.engine.outputs import CompletionOutput, EngineCoreOutput, RequestOutput
from auto_glm.engine.request import FinishReason, Request
from auto_glm.sampling_params import SamplingParams

__all__ = ["EngineClient", "EngineRequestError", "FinishListener", "Sink", "check_token_ids"]

log = logging.getLogger("auto_glm.engine")
Sink = Callable[[RequestOutput | BaseException], None]
# called on the output thread once per request with its final output, or the error that ended it
FinishListener = Callable[[Request, RequestOutput | None, BaseException | None], None]


def check_token_ids(ids: list[int], vocab: int) -> None:
    """Raise ``ValueError`` naming the ids of a prompt that are outside ``[0, vocab)``."""
    bad = [t for t in ids if not isinstance(t, int) or not 0 <= t < vocab]
    if bad:
        raise ValueError(f"prompt token ids {bad[:5]} are outside the vocabulary [0, {vocab})")


class EngineRequestError(RuntimeError):
    """The engine ended a request with an error instead of a result."""


@dataclass
class _Stream:
    request: Request
    sink: Sink
    processor: RequestOutputProcessor
    logprobs: list = field(default_factory=list)  # one entry per output token
    detached: bool = False  # the caller aborted: it gets no more updates, listeners still do

    def send(self, item: RequestOutput | BaseException) -> None:
        if self.detached:
            return
        try:
            self.sink(item)
        except Exception:  # a caller gone away (closed event loop, ...) must not stop delivery
            log.exception("sink of %s failed", self.request.request_id)


class EngineClient:
    def __init__(self, loaded, config: EngineConfig) -> None:
        self.loaded = loaded
        self.tokenizer = loaded.tokenizer
        self.config = config
        self.max_model_len = min(config.max_model_len or loaded.max_model_len, loaded.max_model_len)
        runner = ModelRunner(loaded.model, config, loaded.device, loaded.dtype, self.max_model_len)
        self._outputs: queue.SimpleQueue[list[EngineCoreOutput] | None] = queue.SimpleQueue()
        self.core = EngineCore(runner, config, self.max_model_len, publish=self._outputs.put)
        self._streams: dict[str, _Stream] = {}
        self._lock = threading.Lock()
        self._ids = itertools.count()
        self._listeners: list[FinishListener] = []
        self._out_thread = threading.Thread(
            target=self._output_loop, name="autoglm-output", daemon=True
        )
        self.core.start()
        self._out_thread.start()

    @property
    def num_blocks(self) -> int:
        return self.core.runner.num_blocks

    @property
    def kv_cache_bytes(self) -> int:
        return self.num_blocks * self.core.runner.bytes_per_block

    @property
    def is_alive(self) -> bool:
        return self.core.is_alive and self._out_thread.is_alive()

    def stats(self) -> EngineStats:
        return self.core.stats()

    def replica_stats(self) -> dict[str, EngineClient]:
        """Counters by replica: one local engine is its own (unnamed) replica; a cluster's
        remote engine reports each of its replicas."""
        return {"": self}

    def encode(self, prompt: str | list[int]) -> list[int]:
        """Token ids of ``prompt``; raises ValueError for a prompt that leaves no room in
        ``max_model_len`` or an id outside the vocabulary. Safe on any thread."""
        if isinstance(prompt, str):
            ids = self.tokenizer.encode(prompt, add_special_tokens=True)
            self.core.scheduler.check_prompt_length(len(ids))
            return ids
        ids = list(prompt)
        self.core.scheduler.check_prompt_length(len(ids))
        check_token_ids(ids, self.loaded.model.spec.vocab_size)
        return ids

    def submit(
        self,
        prompt: str | list[int],
        params: SamplingParams,
        sink: Sink,
        request_id: str | None = None,
        priority: int = 0,
        cache_salt: str | None = None,
        tags: dict | None = None,
        tenant: str | None = None,
        weight: float = 1.0,
    ) -> Request:
        """Validate and queue a request; raises ValueError (bad input) before anything runs."""
        if not self.is_alive:
            raise EngineDeadError("the engine loop is not running; restart the server")
        request = Request(
            request_id or f"req-{next(self._ids)}",
            self.encode(prompt),
            params,
            eos_token_ids=self.loaded.eos_token_ids,
            priority=priority,
            cache_salt=cache_salt,
            tags=tags,
            tenant=tenant,
            weight=weight,
        )
        self.core.check_request(request)
        with self._lock:
            if request.request_id in self._streams:
                raise ValueError(f"request id {request.request_id!r} is already in use")
            self._streams[request.request_id] = _Stream(
                request,
                sink,
                RequestOutputProcessor(self.tokenizer, params, request.prompt_token_ids),
            )
        self.core.add_request(request)
        return request

    def add_finish_listener(self, listener: FinishListener) -> None:
        self._listeners.append(listener)

    def abort(self, request_id: str) -> None:
        stream = self._streams.get(request_id)
        if stream is not None:
            stream.detached = True
        self.core.finish_request(request_id, FinishReason.ABORT)

    def shutdown(self) -> None:
        self.core.shutdown()
        self._outputs.put(None)
        self._out_thread.join(timeout=10)

    # ---- output thread ----------------------------------------------------------------
    def _output_loop(self) -> None:
        while (batch := self._outputs.get()) is not None:
            for out in batch:
                try:
                    self._deliver(out)
                except Exception as exc:  # one bad stream must not stall the others
                    log.exception("delivering output of %s failed", out.request_id)
                    self._end(out.request_id, exc)
        for request_id in list(self._streams):  # shutdown: nothing is left hanging
            self._end(request_id, EngineDeadError("engine shut down before the request finished"))

    def _end(self, request_id: str, exc: BaseException) -> None:
        with self._lock:
            stream = self._streams.pop(request_id, None)
        if stream is not None:
            stream.send(exc)
            self._notify(stream.request, None, exc)

    def _notify(
        self, request: Request, output: RequestOutput | None, exc: BaseException | None
    ) -> None:
        if request.metrics.finished_time is None:
            request.metrics.finished_time = time.monotonic()
        for listener in self._listeners:
            try:
                listener(request, output, exc)
            except Exception:  # observability must never break delivery
                log.exception("finish listener failed")

    def _deliver(self, out: EngineCoreOutput) -> None:
        stream = self._streams.get(out.request_id)
        if stream is None:
            return  # already finished here (e.g. by a stop string) or never ours
        if out.error is not None:
            self._end(out.request_id, EngineRequestError(out.error))
            return
        finish, tokens = out.finish_reason, out.new_token_ids
        delta, stop = stream.processor.process(tokens, finished=finish is not None)
        stream.logprobs.extend(out.new_logprobs)
        stop_reason: str | int | None = None
        if stop:
            if finish is None:  # the loop frees the request; its last delta finds no stream
                self.core.finish_request(out.request_id, FinishReason.STOP)
            finish, stop_reason = FinishReason.STOP, stream.processor.stops.matched
        elif finish is FinishReason.STOP and tokens:
            stop_reason = tokens[-1]
        if finish is None and not delta and not tokens:
            return
        completion = CompletionOutput(
            text=stream.processor.text,
            token_ids=list(stream.processor.token_ids),
            delta_text=delta,
            delta_token_ids=tokens,
            finish_reason=finish.value if finish else None,
            logprobs=list(stream.logprobs),
            stop_reason=stop_reason,
        )
        req = stream.request
        result = RequestOutput(
            req.request_id,
            req.prompt_token_ids,
            completion,
            finished=finish is not None,
            num_cached_tokens=req.num_cached_tokens,
            metrics=req.metrics,
        )
        if result.finished:
            with self._lock:
                self._streams.pop(out.request_id, None)
        stream.send(result)
        if result.finished:
            self._notify(req, result, None)
