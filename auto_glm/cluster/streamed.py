"""The front end's side of an engine that runs in another process and streams its updates.

Two kinds of engine run elsewhere: a Ray Serve replica (:mod:`.remote`) and the engine
process of one server (:mod:`.process`). Both describe themselves once
(:func:`describe_engine`), then stream each request's updates as :mod:`.wire` chunks; a
:class:`StreamedEngineClient` offers the part of
:class:`~auto_glm.engine.client.EngineClient` that the front end uses (encode, the
sampling checks, submit, abort, stats, finish listeners), so admission, tenancy, the REST
and gRPC adapters and the metrics run unchanged on either, and :class:`Accumulator` turns
the chunks back into the engine's cumulative :class:`RequestOutput` updates.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

from auto_glm.engine.client import EngineClient, FinishListener, Sink, prompt_token_ids
from auto_glm.engine.config import EngineConfig
from auto_glm.engine.inputs import (
    EngineInput,
    ImageFeatures,
    ImageTokenIds,
    image_offsets,
    prepare_input_with_images,
)
from auto_glm.engine.logit_constraints import check_logit_bias
from auto_glm.engine.outputs import CompletionOutput, RequestOutput, Text, cumulative
from auto_glm.engine.request import FinishReason, Request, RequestStatus
from auto_glm.engine.scheduler import check_prompt_length
from auto_glm.engine.structured import Grammar, GrammarCompiler
from auto_glm.sampling_params import SamplingParams

if TYPE_CHECKING:
    from collections.abc import Sequence

    from PIL import Image

__all__ = ["Accumulator", "StreamedEngineClient", "deliver", "describe_engine"]

log = logging.getLogger("auto_glm.cluster")


def describe_engine(engine: EngineClient) -> dict[str, Any]:
    """What a front end elsewhere needs to tokenize, check limits and report ``engine``'s
    model: plain values, and the tokenizer and image processor that the engine loaded
    (after verifying a registered version's files), so that the front end reads none of
    the model's files itself: they may have changed since, or not be on its machine."""
    loaded = engine.loaded
    model = loaded.model
    return {
        "tokenizer": loaded.tokenizer,
        "image_processor": loaded.image_processor,
        "path": str(Path(loaded.path)),
        "max_model_len": engine.max_model_len,
        "vocab_size": model.spec.vocab_size,
        "eos_token_ids": sorted(loaded.eos_token_ids),
        "weight_dtype": str(loaded.weight_dtype).removeprefix("torch."),
        "dtype": str(loaded.dtype).removeprefix("torch."),
        "quantization": loaded.quantization,
        "device": str(loaded.device),
        "num_blocks": engine.num_blocks,
        "kv_cache_bytes": engine.kv_cache_bytes,
        "engine_config": asdict(engine.config),
        # a vision model's image tokens: (image, video) placeholder ids and patch merging
        "image_tokens": (
            (model.image_token_id, model.video_token_id) if model.accepts_images else None
        ),
        "spatial_merge_size": getattr(model, "spatial_merge_size", None),
    }


class StreamedEngineClient:
    """What every engine elsewhere offers the front end, from its :func:`describe_engine`
    facts, tokenizer and image processor. A vision model's images are preprocessed
    here, with its checkpoint's image processor, and travel to the engine as tensors."""

    def __init__(self, info: dict[str, Any]) -> None:
        self.tokenizer = tokenizer = info["tokenizer"]
        tokens = info["image_tokens"]
        self._image_tokens = None if tokens is None else ImageTokenIds(*tokens)
        self._merge = info["spatial_merge_size"]
        self._image_processor = info["image_processor"]
        self.config = EngineConfig(**info["engine_config"])
        self.max_model_len = info["max_model_len"]
        self.vocab_size = info["vocab_size"]
        self.eos_token_ids = frozenset(info["eos_token_ids"])
        self.num_blocks = info["num_blocks"]
        self.kv_cache_bytes = info["kv_cache_bytes"]
        self.loaded = SimpleNamespace(
            path=Path(info["path"]),
            weight_dtype=info["weight_dtype"],
            dtype=info["dtype"],
            quantization=info.get("quantization", "none"),
            device=info["device"],
        )
        self.grammars = GrammarCompiler(tokenizer, self.vocab_size, self.eos_token_ids)
        self._listeners: list[FinishListener] = []

    @property
    def accepts_images(self) -> bool:
        return self._image_tokens is not None

    def prepare(self, token_ids: list[int], images: Sequence[Image.Image]) -> EngineInput:
        """As :meth:`EngineClient.prepare`: the images preprocessed here."""
        if self._image_tokens is None:
            if images:
                _refuse_images()
            return EngineInput(self.encode(list(token_ids)))
        prepared = prepare_input_with_images(
            token_ids, images, self._image_processor, self._image_tokens, self._merge
        )
        self.encode(prepared.token_ids)
        return prepared

    def checked_input(
        self, prompt: str | list[int] | EngineInput
    ) -> tuple[list[int], tuple[ImageFeatures, ...]]:
        """The token ids and images of a prompt to submit; raises ValueError, before
        anything is sent, for a prompt the engine would refuse (see :meth:`encode`), images
        for a text-only model, or image placeholders that do not match the images."""
        images: tuple[ImageFeatures, ...] = ()
        if isinstance(prompt, EngineInput):
            prompt, images = prompt.token_ids, prompt.images
        ids = self.encode(prompt)
        if images and self._image_tokens is None:
            _refuse_images()
        if self._image_tokens is not None:
            image_offsets(ids, self._image_tokens, images)
        return ids, images

    def check_sampling(self, params: SamplingParams) -> Grammar | None:
        """``logit_bias`` and the structured output checked here, so that a bad one is the
        caller's ValueError (a 400) before anything is sent, also for a stream; the engine
        compiles the grammar again where it runs."""
        if params.logit_bias:
            check_logit_bias(params.logit_bias, self.vocab_size)
        if params.structured_output is None:
            return None
        return self.grammars.grammar(params.structured_output)

    def encode(self, prompt: str | list[int]) -> list[int]:
        """Token ids of ``prompt``; raises ValueError for a prompt that leaves no room in
        ``max_model_len`` or an id outside the vocabulary."""
        if isinstance(prompt, str):
            ids = self.tokenizer.encode(prompt, add_special_tokens=True)
        else:
            ids = prompt_token_ids(prompt, self.vocab_size)
        check_prompt_length(len(ids), self.max_model_len)
        return ids

    def add_finish_listener(self, listener: FinishListener) -> None:
        self._listeners.append(listener)

    def _finish(
        self,
        request: Request,
        output: RequestOutput | None,
        error: BaseException | None,
        sink: Sink | None,
    ) -> None:
        """End ``request``: its error to ``sink`` (when given), then the finish listeners."""
        request.status = RequestStatus.FINISHED
        request.metrics.finished_time = time.monotonic()
        if sink is not None and error is not None:
            deliver(sink, error, request.request_id)
        for listener in self._listeners:
            try:
                listener(request, output, error)
            except Exception:  # observability must never break delivery
                log.exception("finish listener failed")


def _refuse_images() -> None:
    raise ValueError(
        "model does not accept images (it is text-only); send text only, or serve a vision "
        "model such as GLM-4.1V"
    )


def deliver(sink: Sink, item: RequestOutput | BaseException, request_id: str) -> None:
    """``sink(item)``; a sink that fails (its caller gone away) must not stop delivery."""
    try:
        sink(item)
    except Exception:
        log.exception("sink of %s failed", request_id)


class Accumulator:
    """Builds the engine's cumulative :class:`RequestOutput` from the streamed deltas."""

    __slots__ = ("logprobs", "request", "started", "text")

    def __init__(self, request: Request) -> None:
        self.request = request
        self.text = Text()
        self.logprobs: list = []
        self.started = False

    def add(self, chunk: dict[str, Any]) -> RequestOutput:
        request, metrics = self.request, self.request.metrics
        if not self.started:
            self.started = True
            request.status = RequestStatus.RUNNING
            request.replica = chunk["replica"]
            metrics.first_scheduled_time = self._engine_time(chunk["scheduled_ago"])
        ids = chunk["token_ids"]
        if ids and metrics.first_token_time is None:
            metrics.first_token_time = self._engine_time(chunk["first_token_ago"])
        metrics.num_preemptions = chunk["num_preemptions"]
        self.text.append(chunk["text"])
        self.logprobs.extend(chunk["logprobs"])
        request.num_cached_tokens = chunk["num_cached_tokens"]
        request.output_token_ids.extend(ids)  # the request's outputs are the cumulative ids
        request.all_token_ids.extend(ids)
        return self._output(chunk["text"], ids, chunk["finish_reason"], chunk["stop_reason"])

    def status_is(self, status: str) -> None:
        """The engine scheduled the request (``running``) or put it back in its queue
        (``preempted``), maybe before its first chunk, or between two: its status here."""
        if self.request.status is not RequestStatus.FINISHED:
            self.request.status = RequestStatus(status)

    def _engine_time(self, ago: float | None) -> float:
        """This process's clock reading for an engine time that was ``ago`` seconds old when
        its chunk was made (now, for an engine that did not say): never before the
        request's arrival here, nor after now."""
        now = time.monotonic()
        if ago is None:
            return now
        return min(now, max(self.request.metrics.arrival_time, now - ago))

    def aborted(self) -> RequestOutput:
        return self._output("", [], "abort", None)

    def _output(self, delta: str, ids: list[int], finish: str | None, stop) -> RequestOutput:
        request = self.request
        if finish is not None:
            request.finish_reason = FinishReason(finish)
        return RequestOutput(
            request.request_id,
            request.prompt_token_ids,
            CompletionOutput(
                text=self.text.so_far(),
                token_ids=cumulative(request.output_token_ids, finish is not None),
                delta_text=delta,
                delta_token_ids=list(ids),
                finish_reason=finish,
                logprobs=cumulative(self.logprobs, finish is not None),
                stop_reason=stop,
            ),
            finished=finish is not None,
            num_cached_tokens=request.num_cached_tokens,
            metrics=request.metrics,
        )
