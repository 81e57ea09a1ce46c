"""The Python API: ``AutoGLM().generate("Hello")`` and friends, on top of the engine."""

from __future__ import annotations

import queue
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from auto_glm.checkpoints import demo_model_path
from auto_glm.engine.chat_template import encode_chat
from auto_glm.engine.client import EngineClient
from auto_glm.engine.config import EngineConfig
from auto_glm.engine.inputs import EngineInput
from auto_glm.engine.outputs import RequestOutput
from auto_glm.engine.threads import on_own_thread
from auto_glm.loader import load_model
from auto_glm.media import MediaLimits, load_image
from auto_glm.sampling_params import SamplingParams

__all__ = ["AutoGLM", "AutoGLMModel", "GLMModel", "GenerationResult"]


@dataclass
class GenerationResult:
    """One prompt's result from :meth:`GLMModel.generate_batch`."""

    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str
    finish_reason: str  # "stop" | "length" | "abort"


class GLMModel:
    """A loaded model with its own engine (continuous batching over a paged KV cache).

    ``model_name`` is a local Hugging Face model directory or a hub id; ``None`` loads the
    built-in demo model. Engine limits (``max_num_seqs``, ``kv_cache_memory``, ...) are
    :class:`EngineConfig` fields and may be given as keyword arguments. ``quantization``
    (``"none"``, ``"int8"``, ``"w8a8"``) and ``quantize_lm_head`` are as for
    :func:`auto_glm.loader.load_model`. ``media_limits`` bounds the images given to
    :meth:`chat` (as the server's settings of the same names do). ``kv_cache_dtype``
    (``"auto"``, ``"int8"``, ``"fp8_e4m3"``) is the KV cache's precision (see
    :mod:`auto_glm.layers.kv_quant`), ``kv_cache_scales`` (``"dynamic"``, ``"calibrate"``,
    ``"checkpoint"``) where its scales come from (see :mod:`auto_glm.engine.kv_scales`); they
    and the engine limits are checked before the model loads.
    """

    def __init__(
        self,
        model_name: str | None = None,
        device: str = "auto",
        dtype: str | None = None,
        *,
        compute_dtype: str | None = None,
        allow_pickle: bool = False,
        quantization: str = "none",
        quantize_lm_head: bool = False,
        media_limits: MediaLimits | None = None,
        kv_cache_dtype: str = "auto",
        kv_cache_scales: str = "dynamic",
        **engine_options,
    ) -> None:
        config = EngineConfig(  # checked first
            kv_cache_dtype=kv_cache_dtype, kv_cache_scales=kv_cache_scales, **engine_options
        )

        def build() -> EngineClient:
            loaded = load_model(
                model_name or str(demo_model_path()),
                device=device,
                dtype=dtype,
                allow_pickle=allow_pickle,
                compute_dtype=compute_dtype,
                quantization=quantization,
                quantize_lm_head=quantize_lm_head,
            )
            return EngineClient(loaded, config)

        # built on a thread that ends with the build: see auto_glm.engine.threads
        self.engine = on_own_thread(build)
        self.tokenizer = self.engine.tokenizer
        self.media_limits = media_limits or MediaLimits()

    @classmethod
    def from_pretrained(cls, model_name: str, **kwargs) -> GLMModel:
        return cls(model_name, **kwargs)

    def generate(
        self,
        prompt: str,
        max_new_tokens: int = 128,
        temperature: float = 1.0,
        top_p: float = 1.0,
        top_k: int = 0,
        stop: str | list[str] | None = None,
        seed: int | None = None,
        **sampling,
    ) -> str:
        """Generate a continuation of ``prompt`` and return its text. Further keyword
        arguments are :class:`SamplingParams` fields (``min_p``, ``repetition_penalty``...)."""
        params = _params(max_new_tokens, temperature, top_p, top_k, stop, seed, **sampling)
        return self.generate_batch([prompt], params)[0].text

    def generate_batch(
        self, prompts: Sequence[str | list[int] | EngineInput], params: SamplingParams | None = None
    ) -> list[GenerationResult]:
        """Run many prompts (text or token ids) concurrently; results keep the input order."""
        params = params or SamplingParams()
        results: list[RequestOutput | BaseException] = []
        done: queue.Queue[RequestOutput | BaseException] = queue.Queue()
        ids = [self.engine.submit(p, params, _final_only(done)).request_id for p in prompts]
        by_id = {}
        for _ in ids:
            item = done.get()
            if isinstance(item, BaseException):
                for rid in ids:
                    self.engine.abort(rid)
                raise item
            by_id[item.request_id] = item
        results = [by_id[rid] for rid in ids]
        return [
            GenerationResult(
                r.prompt_token_ids, r.outputs.token_ids, r.outputs.text, r.outputs.finish_reason
            )
            for r in results
        ]

    def stream(self, prompt: str | list[int], **sampling) -> Iterator[str]:
        """Yield pieces of text as they are produced; options as for :meth:`generate`."""
        params = _params(**sampling)
        updates: queue.Queue[RequestOutput | BaseException] = queue.Queue()
        request = self.engine.submit(prompt, params, updates.put)
        finished = False
        try:
            while not finished:
                item = updates.get()
                if isinstance(item, BaseException):
                    finished = True
                    raise item
                finished = item.finished
                if item.outputs.delta_text:
                    yield item.outputs.delta_text
        finally:
            if not finished:
                self.engine.abort(request.request_id)

    def chat(self, messages: list[dict[str, Any]], **sampling) -> str:
        """Reply to a conversation, formatted by the model's own chat template; options as
        for :meth:`generate`.

        A message's content is text or a list of parts: ``{"type": "text", "text": ...}``,
        ``{"type": "image", "image": ...}`` (a file path, bytes or a PIL image) or OpenAI's
        ``{"type": "image_url", "image_url": {"url": "data:image/png;base64,..."}}``. Images
        need a vision model; they are checked against ``media_limits``."""
        turns, sources = _chat_turns(messages)
        if sources and not self.engine.accepts_images:
            raise ValueError(
                f"model {self.engine.loaded.path.name!r} does not accept images; send text "
                "only, or load a vision model (GLM-4.1V)"
            )
        images = [
            load_image(source, self.media_limits, f"image {i + 1}")
            for i, source in enumerate(sources)
        ]
        ids = encode_chat(self.tokenizer, turns)
        prompt = self.engine.prepare(ids, images) if images else ids
        return self.generate_batch([prompt], _params(**sampling))[0].text

    def close(self) -> None:
        self.engine.shutdown()

    def __enter__(self) -> GLMModel:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _params(
    max_new_tokens: int = 128,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    stop: str | list[str] | None = None,
    seed: int | None = None,
    **extra,
) -> SamplingParams:
    if "max_tokens" in extra:  # the server's name for it; here it would clash
        raise ValueError(
            f"max_tokens={extra['max_tokens']!r}: pass max_new_tokens, the number of tokens "
            "to generate (max_tokens is its name in the OpenAI API)"
        )
    return SamplingParams(
        max_tokens=max_new_tokens,
        temperature=temperature,
        top_p=top_p,
        top_k=top_k,
        stop=stop or [],
        seed=seed,
        **extra,
    )


def _chat_turns(messages: list[dict[str, Any]]) -> tuple[list[dict], list[Any]]:
    """``messages`` with each image part as the template's ``{"type": "image"}``, and the
    images' sources in order."""
    if not isinstance(messages, list | tuple) or not all(isinstance(m, dict) for m in messages):
        raise ValueError(
            "messages must be a list of message dicts, e.g. "
            f'[{{"role": "user", "content": "Hi"}}]; got {_shape(messages)}'
        )
    turns, sources = [], []
    for message in messages:
        content = message.get("content")
        if isinstance(content, list):
            parts = []
            for part in content:
                kind = part.get("type")
                if kind == "image":
                    sources.append(part.get("image"))
                elif kind == "image_url":
                    url = part["image_url"]
                    sources.append(url["url"] if isinstance(url, dict) else url)
                parts.append({"type": "image"} if kind in ("image", "image_url") else part)
            message = {**message, "content": parts}
        turns.append(message)
    return turns, sources


def _shape(messages: object) -> str:
    if isinstance(messages, list | tuple):
        item = next(m for m in messages if not isinstance(m, dict))
        return f"a list holding a {type(item).__name__}"
    return f"a {type(messages).__name__}"


def _final_only(done: queue.Queue):
    def sink(item: RequestOutput | BaseException) -> None:
        if isinstance(item, BaseException) or item.finished:
            done.put(item)

    return sink


AutoGLM = GLMModel
AutoGLMModel = GLMModel
