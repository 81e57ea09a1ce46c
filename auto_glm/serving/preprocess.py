"""Prompts and chat messages -> token ids, in a worker pool, within ``max_prompt_chars``.

Tokenizing a long prompt or rendering a chat template takes up to a second; on the event
loop it would stall every stream and the health probes. The work runs in a small thread
pool instead (the tokenizers library releases the GIL while it encodes). The character
limit is checked first, so an oversized prompt costs nothing but the check.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

from auto_glm.engine.chat_template import ChatTemplateError, encode_chat
from auto_glm.engine.client import EngineClient
from auto_glm.serving.errors import APIError
from auto_glm.serving.protocol import ChatMessage

__all__ = ["Preprocessor"]

_WORKERS = 2


class Preprocessor:
    """Shared by every served model: each call names the engine whose tokenizer it uses."""

    def __init__(self, max_prompt_chars: int) -> None:
        self.max_prompt_chars = max_prompt_chars
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
            raise APIError(400, str(exc), param=param, code="invalid_prompt") from exc

    async def chat(self, client: EngineClient, messages: Sequence[ChatMessage]) -> list[int]:
        """Token ids of the conversation in the model's chat template, ready for the reply."""
        # "developer" is OpenAI's newer name for the system role; templates know only "system"
        turns = [
            {"role": "system" if m.role == "developer" else m.role, "content": m.text}
            for m in messages
        ]
        self._check_size(sum(len(t["content"]) for t in turns), "messages")
        try:
            return await self._run(encode_chat, client.tokenizer, turns)
        except ChatTemplateError as exc:
            raise APIError(400, str(exc), param="messages", code=exc.code) from exc

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
