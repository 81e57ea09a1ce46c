"""``autoglm.v1.Inference`` on the front end: the gRPC adapter of the REST routes' logic.

Each call authenticates with the ``authorization: Bearer KEY`` metadata, becomes the same
request model a REST body would (validated alike), runs through :class:`Frontend`, and
streams one response per engine update. Refusals abort the call with the gRPC code of the
REST status and the same message. A caller that cancels, or whose deadline passes, ends the
handler, which closes the generation: its engine requests are aborted and their KV blocks
freed at once.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from functools import partial
from typing import Any

import grpc
from fastapi import FastAPI

from auto_glm.engine.outputs import RequestOutput
from auto_glm.observability.exchange import Exchange
from auto_glm.observability.rpc import ObservedCall, observe_call
from auto_glm.rpc.convert import (
    ChatReading,
    chat_body,
    completion_body,
    model_list,
    response_fields,
    usage_message,
)
from auto_glm.rpc.decoding import decoded
from auto_glm.rpc.status import grpc_code, trailing_metadata
from auto_glm.rpc.v1 import inference_pb2 as pb
from auto_glm.rpc.v1 import inference_pb2_grpc
from auto_glm.serving.errors import APIError, routed_error
from auto_glm.serving.frontend import Call, Frontend
from auto_glm.serving.openai_stream import StreamSpec
from auto_glm.serving.tenancy import key_from_headers
from auto_glm.tenants import Tenant

__all__ = ["SERVICE", "InferenceServicer"]

SERVICE = pb.DESCRIPTOR.services_by_name["Inference"].full_name  # autoglm.v1.Inference
Start = Callable[[Tenant | None, Exchange], Awaitable[Call]]
# one response's fields from (version, choice index, engine update)
Fields = Callable[[str, int, RequestOutput], dict[str, Any]]


class InferenceServicer(inference_pb2_grpc.InferenceServicer):
    def __init__(self, app: FastAPI) -> None:
        self.frontend = Frontend(app.state.serving)
        self.observability = app.state.observability

    async def Generate(  # noqa: N802 - the method names of the service
        self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.GenerateResponse]:
        async def start(tenant: Tenant | None, exchange: Exchange) -> Call:
            return await self.frontend.complete(completion_body(request), tenant, exchange)

        def fields(spec: StreamSpec) -> Fields:
            return partial(response_fields, spec)

        stream = self._stream(context, "Generate", start, fields, pb.GenerateResponse)
        async for response in stream:
            yield response

    async def Chat(  # noqa: N802
        self, request: pb.ChatRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.ChatResponse]:
        async def start(tenant: Tenant | None, exchange: Exchange) -> Call:
            return await self.frontend.chat(chat_body(request), tenant, exchange)

        async for response in self._stream(context, "Chat", start, ChatReading, pb.ChatResponse):
            yield response

    async def ListModels(  # noqa: N802
        self, request: pb.ListModelsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListModelsResponse | None:
        method = f"/{SERVICE}/ListModels"
        metadata = _metadata(context)
        async with observe_call(self.observability, method, metadata) as observed:
            try:
                decoded(request)
                await self._tenant(metadata, observed.exchange)
                await context.send_initial_metadata(observed.ids)
                return model_list(self.frontend.models())
            except Exception as exc:
                await _abort(context, observed, exc)

    async def _tenant(self, metadata: dict[str, str], exchange: Exchange) -> Tenant | None:
        key = key_from_headers(metadata.get("authorization"), metadata.get("x-api-key"))
        tenant = await self.frontend.identify(key)
        if tenant is not None:
            exchange.tenant = tenant.name
        return tenant

    async def _stream(
        self,
        context: grpc.aio.ServicerContext,
        name: str,
        start: Start,
        fields_of: Callable[[StreamSpec], Fields],
        message: type,
    ) -> AsyncIterator:
        method = f"/{SERVICE}/{name}"
        metadata = _metadata(context)
        async with observe_call(self.observability, method, metadata) as observed:
            call: Call | None = None
            try:
                tenant = await self._tenant(metadata, observed.exchange)
                call = await start(tenant, observed.exchange)
                await context.send_initial_metadata(
                    (*observed.ids, *((k.lower(), v) for k, v in call.metadata.items()))
                )
                generation, spec = call.generation, call.spec
                fields = fields_of(spec)
                async for index, output in generation.outputs():
                    response = message(**fields(call.lease.version, index, output))
                    if not generation.num_unfinished:  # the call's last response
                        outputs = [generation.last[i] for i in range(len(generation.requests))]
                        response.usage.CopyFrom(usage_message(outputs, spec.n))
                    yield response
            except asyncio.CancelledError:
                observed.status = 504 if _deadline_passed(context) else 499
                raise
            except Exception as exc:
                await _abort(context, observed, exc)
            finally:
                if call is not None:
                    call.generation.close()


async def _abort(context: grpc.aio.ServicerContext, observed: ObservedCall, exc: Exception):
    """End the call with the status of REST's answer to ``exc``, its message, and in the
    trailers its metadata and the call's ids (which the log and trace have)."""
    error: APIError = routed_error(exc, observed.exchange)
    observed.status = error.status
    await context.abort(grpc_code(error), error.message, (*trailing_metadata(error), *observed.ids))


def _metadata(context: grpc.aio.ServicerContext) -> dict[str, str]:
    return {
        key.lower(): value
        for key, value in (context.invocation_metadata() or ())
        if isinstance(value, str)
    }


def _deadline_passed(context: grpc.aio.ServicerContext) -> bool:
    remaining = context.time_remaining()
    return remaining is not None and remaining <= 0
