"""The transport-neutral front end: one call from a validated request to running engine work.

REST (:mod:`.openai_routes`, :mod:`.native_routes`) and gRPC (:mod:`auto_glm.rpc`) adapters
turn their wire formats into the request models of :mod:`.protocol`, call :class:`Frontend`,
and turn its :class:`Call` (the served version, the generation streaming from the engine,
the metadata every response carries) back into their wire formats. Routing, tenancy checks,
tokenizing, defaults, sampling parameters and admission live here once; every refusal is an
:class:`~auto_glm.serving.errors.APIError`, which each adapter maps to its own status codes.
"""

from __future__ import annotations

import logging
import time
import uuid
from dataclasses import dataclass

from auto_glm.fleet import Lease
from auto_glm.observability.exchange import Exchange, expecting
from auto_glm.sampling_params import SamplingParams
from auto_glm.serving.errors import APIError
from auto_glm.serving.generation import Generation
from auto_glm.serving.openai_format import sampling_params
from auto_glm.serving.openai_stream import StreamSpec
from auto_glm.serving.preprocess import Prompt, prompt_length
from auto_glm.serving.protocol import (
    MAX_N,
    ChatCompletionRequest,
    CompletionRequest,
    GenerateRequest,
)
from auto_glm.serving.reply import plan_reply
from auto_glm.serving.responses import ModelCard, VersionCard
from auto_glm.serving.state import ServingState
from auto_glm.tenants import Tenant

__all__ = ["Call", "Frontend"]

log = logging.getLogger("auto_glm.serving")


@dataclass
class Call:
    """One admitted call: where it runs, its engine requests, what its responses repeat."""

    lease: Lease
    generation: Generation
    spec: StreamSpec
    metadata: dict[str, str]  # rate limits and the serving version: headers, or gRPC metadata


class Frontend:
    def __init__(self, state: ServingState) -> None:
        self.state = state

    async def identify(self, key: str | None) -> Tenant | None:
        """The tenant of an API key (401 for a bad one); None when authentication is off."""
        return await self.state.tenancy.identify(key)

    async def chat(
        self, body: ChatCompletionRequest, tenant: Tenant | None, exchange: Exchange | None
    ) -> Call:
        """Start a chat completion: the conversation in the model's chat template."""
        _check_stream_options(body)
        if body.top_logprobs and not body.logprobs:
            raise APIError(
                400, "top_logprobs needs logprobs=true", param="top_logprobs", code="invalid_value"
            )
        state = self.state
        async with state.routed(body.model, tenant, exchange, body.user) as lease:
            client = lease.client
            config = state.config
            reply = plan_reply(body, client, config.tool_call_parser, config.reasoning_parser)
            prompt = await state.preprocessor.chat(
                client, body.messages, lease.model, reply.tools.tools, body.chat_template_kwargs
            )
            max_tokens = (
                body.max_completion_tokens
                or body.max_tokens
                or _default_max_tokens(client.max_model_len, prompt_length(prompt), tenant, body.n)
            )
            logprobs = (body.top_logprobs or 0) if body.logprobs else None
            if logprobs is not None:
                await state.preprocessor.read_token_bytes(client)
            spec = _spec(lease, "chatcmpl", body.n, logprobs, body)
            spec.reply = reply
            log.debug("%s: chat, user=%s, n=%d", spec.call_id, body.user, body.n)
            work = [
                (prompt, reply.constrain(sampling_params(body, max_tokens, logprobs, i)))
                for i in range(body.n)
            ]
            # a forced tool call's grammar is made of the tools' schemas
            forced = reply.tools.structured_output is not None
            schema_param = "tools" if forced else "response_format"
            await state.preprocessor.check_sampling(client, work[0][1], schema_param)
        return await self._start(lease, spec, work, tenant, exchange, body, "messages")

    async def complete(
        self, body: CompletionRequest, tenant: Tenant | None, exchange: Exchange | None
    ) -> Call:
        """Start a text completion of one prompt or a batch of them."""
        _check_stream_options(body)
        prompts = body.prompt
        # one prompt (text or token ids) or a batch of them
        if isinstance(prompts, str) or isinstance(prompts[0], int):
            prompts = [prompts]
        if len(prompts) * body.n > MAX_N:
            raise APIError(
                400,
                f"{len(prompts)} prompts x n={body.n} asks for {len(prompts) * body.n} "
                f"choices; one call may ask for at most {MAX_N}",
                param="n",
                code="too_many_choices",
            )
        state = self.state
        async with state.routed(body.model, tenant, exchange, body.user) as lease:
            token_ids = await state.preprocessor.prompts(lease.client, prompts, "prompt")
            spec = _spec(lease, "cmpl", body.n, body.logprobs, body)
            log.debug(
                "%s: completion, user=%s, prompts=%d, n=%d",
                spec.call_id,
                body.user,
                len(prompts),
                body.n,
            )
            max_tokens = body.max_tokens or 16  # OpenAI's default for completions
            work = [
                (prompt, sampling_params(body, max_tokens, body.logprobs, i))
                for prompt in token_ids
                for i in range(body.n)
            ]
            await state.preprocessor.check_sampling(lease.client, work[0][1])
        return await self._start(lease, spec, work, tenant, exchange, body, "prompt")

    async def generate(
        self, body: GenerateRequest, tenant: Tenant | None, exchange: Exchange | None
    ) -> Call:
        """Start the design documents' ``/generate``: one prompt, one whole reply."""
        stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        try:
            params = SamplingParams(
                max_tokens=body.max_new_tokens,
                temperature=body.temperature,
                top_p=body.top_p,
                top_k=body.top_k,
                stop=stop,
                seed=body.seed,
            )
        except ValueError as exc:
            raise APIError(400, str(exc), code="invalid_value") from exc
        state = self.state
        async with state.routed(body.model, tenant, exchange) as lease:
            [prompt] = await state.preprocessor.prompts(lease.client, [body.prompt], "prompt")
            spec = StreamSpec(
                f"gen-{uuid.uuid4().hex}",
                lease.model,
                int(time.time()),
                lease.client.tokenizer,
                1,
                None,
                False,
            )
        generation = await state.admission.start(
            lease,
            spec.call_id,
            [(prompt, params)],
            expecting(exchange),
            tenant=tenant,
            priority=state.tenancy.priority(tenant, body.priority),
            stream=False,
            prompt_param="prompt",
        )
        return Call(lease, generation, spec, state.headers(tenant, lease))

    def models(self) -> list[ModelCard]:
        """Every served model, with the state of the version that gets most of its traffic
        (``ready``, ``loading``, ``unloaded`` after ``keep_alive``, ``failed``: also a
        loaded version whose engine has stopped)."""
        state = self.state
        cards = []
        for model in state.table.models.values():
            stable = model.versions[model.traffic.stable]
            engine = stable.engine
            cards.append(
                ModelCard(
                    id=model.name,
                    created=state.loaded_at,
                    max_model_len=engine.max_model_len if engine is not None else None,
                    version=stable.version,
                    state=stable.shown_state.value,
                    versions=[
                        VersionCard(
                            version=v.version, state=v.shown_state.value, weight=model.weight(k)
                        )
                        for k, v in model.versions.items()
                    ],
                )
            )
        return cards

    async def _start(
        self,
        lease: Lease,
        spec: StreamSpec,
        work: list[tuple[Prompt, SamplingParams]],
        tenant: Tenant | None,
        exchange: Exchange | None,
        body: ChatCompletionRequest | CompletionRequest,
        prompt_param: str,
    ) -> Call:
        state = self.state
        generation = await state.admission.start(
            lease,
            spec.call_id,
            work,
            expecting(exchange, len(work)),
            tenant=tenant,
            priority=state.tenancy.priority(tenant, body.priority),
            choices_per_prompt=body.n,
            stream=body.stream,
            prompt_param=prompt_param,
        )
        return Call(lease, generation, spec, state.headers(tenant, lease))


def _default_max_tokens(
    max_model_len: int, prompt_tokens: int, tenant: Tenant | None, n: int
) -> int:
    """A chat's ``max_tokens`` when the call gives none: as long as the context allows
    (OpenAI's default), but for a tenant whose ``tpm`` or ``daily_tokens`` could never hold
    that, as long as that limit allows (the prompt once, then each choice its share), so
    that the call fits in the tenant's limits rather than being refused every time."""
    rest = max(max_model_len - prompt_tokens, 1)
    largest = tenant.limits.largest_call if tenant is not None else None
    if largest is not None and (largest - prompt_tokens) // n >= 1:
        rest = min(rest, (largest - prompt_tokens) // n)
    return rest


def _spec(
    lease: Lease,
    prefix: str,
    n: int,
    logprobs: int | None,
    body: ChatCompletionRequest | CompletionRequest,
) -> StreamSpec:
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    return StreamSpec(
        f"{prefix}-{uuid.uuid4().hex}",
        lease.model,
        int(time.time()),
        lease.client.tokenizer,
        n,
        logprobs,
        include_usage,
    )


def _check_stream_options(body: ChatCompletionRequest | CompletionRequest) -> None:
    if body.stream_options is not None and not body.stream:
        raise APIError(
            400,
            "stream_options is only allowed when stream is true; drop it or set stream",
            param="stream_options",
            code="invalid_value",
        )
