"""Prompts and chat messages -> token ids, in a worker pool, within ``max_prompt_chars``.

Tokenizing a long prompt or rendering a chat template takes up to a second; on the event
loop it would stall every stream and the health probes. The work runs in a small thread
pool instead (the tokenizers library releases the GIL while it encodes). The character
limit is checked first, so an oversized prompt costs nothing but the check.

A conversation with images becomes an :class:`~auto_glm.engine.inputs.EngineInput`: the
model must accept images and the count must be within ``max_images_per_request`` (both
checked before anything is fetched or decoded); the images are loaded by
:class:`~auto_glm.serving.media.ImageLoader`, the template renders one placeholder per
image, and the engine's ``prepare`` (on the worker pool) turns them into features.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

from auto_glm.engine.chat_template import ChatTemplateError, encode_chat
from auto_glm.engine.client import EngineClient
from auto_glm.engine.inputs import EngineInput, ImageInputError
from auto_glm.engine.structured import GrammarError
from auto_glm.sampling_params import SamplingParams
from auto_glm.serving.chat_turns import tool_fields
from auto_glm.serving.errors import APIError, prompt_error
from auto_glm.serving.media import ImageLoader, image_parts
from auto_glm.serving.protocol import ChatMessage
from auto_glm.serving.token_bytes import token_bytes

__all__ = ["Preprocessor", "Prompt", "prompt_length"]

_WORKERS = 2
Prompt = list[int] | EngineInput  # what the engine is handed for one prompt


def prompt_length(prompt: Prompt) -> int:
    """Tokens of a prompt, image tokens included."""
    return len(prompt.token_ids) if isinstance(prompt, EngineInput) else len(prompt)


def _turn(message: ChatMessage) -> dict:
    # "developer" is OpenAI's newer name for the system role; templates know only "system"
    role = "system" if message.role == "developer" else message.role
    if not message.images:
        return {"role": role, "content": message.text}
    parts = [
        {"type": "text", "text": part.text} if part.type == "text" else {"type": "image"}
        for part in message.content
    ]
    return {"role": role, "content": parts}


class Preprocessor:
    """Shared by every served model: each call names the engine whose tokenizer it uses."""

    def __init__(self, max_prompt_chars: int, images: ImageLoader) -> None:
        self.max_prompt_chars = max_prompt_chars
        self.images = images
        self._pool = ThreadPoolExecutor(_WORKERS, thread_name_prefix="autoglm-tokenize")

    def _check_size(self, chars: int, param: str) -> None:
        if chars > self.max_prompt_chars:
            raise APIError(
                400,
                f"{param} holds {chars} characters of text, over max_prompt_chars="
                f"{self.max_prompt_chars}; shorten the prompt, or raise max_prompt_chars "
                "(--max-prompt-chars)",
                param=param,
                code="prompt_too_large",
            )

    async def _run(self, work, *args):
        return await asyncio.get_running_loop().run_in_executor(self._pool, work, *args)

    async def prompts(
        self, client: EngineClient, prompts: Sequence[str | list[int]], param: str
    ) -> list[list[int]]:
        """Token ids of each prompt (text is tokenized, ids are checked against the
        vocabulary); raises APIError 400 for text over the limit or a bad token id."""
        self._check_size(sum(len(p) for p in prompts if isinstance(p, str)), param)
        try:
            return await self._run(lambda: [client.encode(p) for p in prompts])
        except ValueError as exc:
            raise prompt_error(exc, param) from exc

    async def chat(
        self,
        client: EngineClient,
        messages: Sequence[ChatMessage],
        model: str,
        tools: Sequence[dict] | None = None,
        template_kwargs: dict | None = None,
    ) -> Prompt:
        """The conversation in the model's chat template, ready for the reply: token ids,
        or an EngineInput when it holds images (``model`` is its name in errors)."""
        parts = image_parts(messages)
        if parts and not client.accepts_images:
            raise APIError(
                400,
                f"model {model!r} does not accept images; send text only, or use a vision "
                "model (GLM-4.1V)",
                param=parts[0][0],
                code="images_not_supported",
            )
        self.images.check_count(len(parts))
        self._check_size(sum(len(m.text) for m in messages), "messages")
        turns = [{**_turn(m), **tool_fields(m, i)} for i, m in enumerate(messages)]
        try:
            ids = await self._run(encode_chat, client.tokenizer, turns, tools, template_kwargs)
        except ChatTemplateError as exc:
            raise APIError(400, str(exc), param=exc.param, code=exc.code) from exc
        if not parts:
            return ids
        images = await self.images.load(parts)  # after the template, which fails cheaper
        try:
            return await self._run(client.prepare, ids, images)
        except ImageInputError as exc:
            raise APIError(400, str(exc), param=parts[exc.index][0], code=exc.code) from exc
        except ValueError as exc:
            raise prompt_error(exc, "messages") from exc

    async def check_sampling(
        self, client: EngineClient, params: SamplingParams, schema_param: str = "response_format"
    ) -> None:
        """Check ``logit_bias`` and compile the structured output of one call's choices
        (they share both) on the worker pool, so that the engine's submit, on the event
        loop, finds the grammar compiled; 400 for a bad schema (naming ``schema_param``,
        where it came from) or bias."""
        if params.structured_output is None and not params.logit_bias:
            return
        try:
            await self._run(client.check_sampling, params)
        except GrammarError as exc:
            raise APIError(400, str(exc), param=schema_param, code="invalid_schema") from exc
        except ValueError as exc:
            raise APIError(400, str(exc), param="logit_bias", code="invalid_logit_bias") from exc

    async def read_token_bytes(self, client: EngineClient) -> None:
        """Ready the bytes of the model's tokens for chat logprobs, on the worker pool (once
        per tokenizer; about a second for a large vocabulary)."""
        await self._run(token_bytes, client.tokenizer)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        self.images.close()
