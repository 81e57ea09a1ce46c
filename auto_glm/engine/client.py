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
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from auto_glm.engine.config import EngineConfig
from auto_glm.engine.core import EngineCore, EngineDeadError, EngineStats
from auto_glm.engine.heap import freeze_heap, thaw_heap
from auto_glm.engine.inputs import (
    EngineInput,
    ImageFeatures,
    ImageTokenIds,
    RequestInputError,
    image_offsets,
    prepare_input_with_images,
)
from auto_glm.engine.kv_scales import prepare_kv_scales
from auto_glm.engine.logit_constraints import check_logit_bias
from auto_glm.engine.model_runner import ModelRunner
from auto_glm.engine.output_processor import RequestOutputProcessor
from auto_glm.engine.outputs import (
    CompletionOutput,
    EngineCoreOutput,
    RequestOutput,
    cumulative,
)
from auto_glm.engine.request import Caller, FinishReason, Request
from auto_glm.engine.structured import Grammar, GrammarCompiler
from auto_glm.platforms import platform_for
from auto_glm.sampling_params import SamplingParams

if TYPE_CHECKING:
    from PIL import Image

__all__ = [
    "EngineClient",
    "EngineRequestError",
    "FinishListener",
    "Sink",
    "prompt_token_ids",
]

log = logging.getLogger("auto_glm.engine")
Sink = Callable[[RequestOutput | BaseException], None]
# called on the output thread once per request with its final output, or the error that ended it
FinishListener = Callable[[Request, RequestOutput | None, BaseException | None], None]


def prompt_token_ids(prompt: object, vocab: int) -> list[int]:
    """A prompt given as token ids, as a list; ``ValueError`` for a prompt that is neither
    text nor a list of ids, a non-integer id, or an id outside ``[0, vocab)``."""
    if not isinstance(prompt, list | tuple):
        raise ValueError(
            f"prompt must be text or a list of token ids, got {type(prompt).__name__}"
            + (" (convert it with .tolist())" if hasattr(prompt, "tolist") else "")
        )
    odd = [t for t in prompt if isinstance(t, bool) or not isinstance(t, int)]
    if odd:
        raise ValueError(f"prompt token ids must be integers, got {odd[:5]}")
    bad = [t for t in prompt if not 0 <= t < vocab]
    if bad:
        raise ValueError(f"prompt token ids {bad[:5]} are outside the vocabulary [0, {vocab})")
    return list(prompt)


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
        vocab = loaded.model.spec.vocab_size
        self.grammars = GrammarCompiler(self.tokenizer, vocab, loaded.eos_token_ids)
        model = loaded.model
        self._image_tokens = (
            ImageTokenIds(model.image_token_id, model.video_token_id)
            if model.accepts_images
            else None
        )
        max_len = loaded.max_model_len
        # built in the engine's device (cuda:N), whichever is the calling thread's
        with platform_for(loaded.device).on_device():
            config = prepare_kv_scales(loaded, config)  # before the runner sizes the cache
            self.max_model_len = min(config.max_model_len or max_len, max_len)
            if (config.max_model_len or 0) > max_len:
                log.warning(
                    "max_model_len=%d is past %s's context (max_position_embeddings=%d): "
                    "serving %d tokens at most",
                    config.max_model_len,
                    loaded.path.name,
                    max_len,
                    max_len,
                )
            runner = ModelRunner(
                model,
                config,
                loaded.device,
                loaded.dtype,
                self.max_model_len,
                weight_dtype=loaded.weight_dtype,
            )
        self._fit_cache(runner.num_blocks * config.block_size, config)
        self.config = config
        self._outputs: queue.SimpleQueue[list[EngineCoreOutput] | None] = queue.SimpleQueue()
        self.core = EngineCore(runner, config, self.max_model_len, publish=self._outputs.put)
        self._streams: dict[str, _Stream] = {}
        self._lock = threading.Lock()
        self._ids = itertools.count()
        self._listeners: list[FinishListener] = []
        # CPU seconds the output thread spent delivering (detokenizing, stop strings, sinks)
        self.output_time = 0.0
        self._out_thread = threading.Thread(
            target=self._output_loop, name="autoglm-output", daemon=True
        )
        freeze_heap()  # built: see auto_glm.engine.heap
        self.core.start()
        self._out_thread.start()

    def _fit_cache(self, capacity: int, config: EngineConfig) -> None:
        """Serve sequences no longer than the KV cache holds (the last token is sampled,
        never fed): past that, every request that may grow to ``max_model_len``, as a chat
        call without max_tokens does, would be refused."""
        if capacity + 1 >= self.max_model_len:
            return
        source = (
            f"kv_cache_memory={config.kv_cache_memory} bytes"
            if config.kv_cache_memory is not None
            else f"kv_cache_fraction={config.kv_cache_fraction} of the free memory"
        )
        log.warning(
            "the KV cache holds %d tokens (%s), fewer than max_model_len=%d: serving %d "
            "tokens at most; give the cache more memory (kv_cache_memory) to serve more",
            capacity,
            source,
            self.max_model_len,
            capacity + 1,
        )
        self.max_model_len = capacity + 1

    @property
    def num_blocks(self) -> int:
        return self.core.runner.num_blocks

    @property
    def kv_cache_bytes(self) -> int:
        return self.num_blocks * self.core.runner.bytes_per_block

    @property
    def accepts_images(self) -> bool:
        """Whether the model takes images (see :meth:`prepare`)."""
        return self._image_tokens is not None

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
        ids = prompt_token_ids(prompt, self.loaded.model.spec.vocab_size)
        self.core.scheduler.check_prompt_length(len(ids))
        return ids

    def prepare(self, token_ids: list[int], images: Sequence[Image.Image]) -> EngineInput:
        """A submittable input from a chat-template rendering and its images, in order.

        ``token_ids`` has one image placeholder token per image (between the begin/end of
        image tokens); each is expanded to the image's token count after the checkpoint's
        image processor has run. Raises ValueError when images are given to a model that
        does not accept images, when placeholders and images differ in number, for a video
        placeholder (video input is not implemented), or for a prompt too long for
        ``max_model_len``. Safe on any thread.
        """
        if self._image_tokens is None:
            if images:
                self._refuse_images()
            return EngineInput(self.encode(list(token_ids)))
        prepared = prepare_input_with_images(
            token_ids,
            images,
            self.loaded.image_processor,
            self._image_tokens,
            self.loaded.model.spatial_merge_size,
        )
        self.encode(prepared.token_ids)
        return prepared

    def _refuse_images(self) -> None:
        raise ValueError(
            f"model does not accept images ({type(self.loaded.model).__name__} is "
            "text-only); send text only, or serve a vision model such as GLM-4.1V"
        )

    def _image_offsets(self, ids: list[int], images: tuple[ImageFeatures, ...]) -> tuple[int, ...]:
        """Where each image's placeholders start in ``ids``; raises ValueError on a
        mismatch (checked for every prompt of a model that takes images)."""
        if self._image_tokens is None:
            if images:
                self._refuse_images()
            return ()
        return image_offsets(ids, self._image_tokens, images)

    def submit(
        self,
        prompt: str | list[int] | EngineInput,
        params: SamplingParams,
        sink: Sink,
        request_id: str | None = None,
        priority: int = 0,
        cache_salt: str | None = None,
        caller: Caller | None = None,
        tenant: str | None = None,
        weight: float = 1.0,
    ) -> Request:
        """Validate and queue a request; raises ValueError (bad input) before anything runs."""
        if not self.is_alive:
            raise EngineDeadError("the engine loop is not running; restart the server")
        images: tuple[ImageFeatures, ...] = ()
        if isinstance(prompt, EngineInput):
            prompt, images = prompt.token_ids, prompt.images
        ids = self.encode(prompt)
        offsets = self._image_offsets(ids, images)
        request = Request(
            request_id or f"req-{next(self._ids)}",
            ids,
            params,
            eos_token_ids=self.loaded.eos_token_ids,
            priority=priority,
            cache_salt=cache_salt,
            caller=caller,
            tenant=tenant,
            weight=weight,
            grammar=self.check_sampling(params),
            images=images,
            image_offsets=offsets,
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

    def check_sampling(self, params: SamplingParams) -> Grammar | None:
        """Check ``logit_bias`` and compile the structured output, on the caller's thread;
        raises ValueError for either. Compiled grammars are cached, so a caller that runs
        this on a worker thread first (the server does) leaves submit a cheap copy."""
        if params.logit_bias:
            check_logit_bias(params.logit_bias, self.loaded.model.spec.vocab_size)
        if params.structured_output is None:
            return None
        return self.grammars.grammar(params.structured_output)

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
        thaw_heap()  # what the engine leaves in cycles can be collected now

    # ---- output thread ----------------------------------------------------------------
    def _output_loop(self) -> None:
        while (batch := self._outputs.get()) is not None:
            start = time.thread_time()
            for out in batch:
                try:
                    self._deliver(out)
                except Exception as exc:  # one bad stream must not stall the others
                    log.exception("delivering output of %s failed", out.request_id)
                    self._end(out.request_id, exc)
                    self.core.finish_request(out.request_id)  # nobody reads it any more
            self.output_time += time.thread_time() - start
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
            failure = (
                RequestInputError(out.error, out.error_code)
                if out.error_code is not None
                else EngineRequestError(out.error)
            )
            self._end(out.request_id, failure)
            return
        finish, tokens = out.finish_reason, out.new_token_ids
        req = stream.request
        stop_ids = req.sampling_params.stop_token_ids
        stop_token = (
            finish is FinishReason.STOP
            and bool(tokens)
            and (tokens[-1] in req.eos_token_ids or tokens[-1] in stop_ids)
        )
        delta, stop = stream.processor.process(tokens, finish is not None, stop_token)
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
        last = finish is not None
        completion = CompletionOutput(
            text=stream.processor.text_so_far(),
            token_ids=cumulative(stream.processor.output_ids, last),
            delta_text=delta,
            delta_token_ids=tokens,
            finish_reason=finish.value if finish else None,
            logprobs=cumulative(stream.logprobs, last),
            stop_reason=stop_reason,
        )
        result = RequestOutput(
            req.request_id,
            req.prompt_token_ids,
            completion,
            finished=last,
            num_cached_tokens=req.num_cached_tokens,
            metrics=req.metrics,
        )
        if result.finished:
            with self._lock:
                self._streams.pop(out.request_id, None)
        stream.send(result)
        if result.finished:
            self._notify(req, result, None)
