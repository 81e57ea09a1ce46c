"""What every handler needs: the engine, the settings, admission, tokenizing, tenancy, the
served model's name; and ``caller``, the dependency that says which tenant is calling."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

from fastapi import Request

from auto_glm.engine.client import EngineClient
from auto_glm.engine.outputs import RequestOutput
from auto_glm.observability.exchange import exchange_of
from auto_glm.serving.admission import Admission
from auto_glm.serving.config import ServerConfig
from auto_glm.serving.errors import APIError, clip
from auto_glm.serving.generation import Generation
from auto_glm.serving.preprocess import Preprocessor
from auto_glm.serving.tenancy import Tenancy, key_from_headers
from auto_glm.tenants import Tenant

__all__ = ["ServingState", "caller", "collect", "get_state"]


@dataclass
class ServingState:
    client: EngineClient
    config: ServerConfig
    admission: Admission
    preprocessor: Preprocessor
    model_name: str
    tenancy: Tenancy
    # when the model was loaded: the `created` of /v1/models (responses carry their own time)
    loaded_at: int = field(default_factory=lambda: int(time.time()))

    @property
    def tokenizer(self):
        return self.client.tokenizer

    @property
    def max_model_len(self) -> int:
        return self.client.max_model_len

    def resolve_model(self, requested: str | None, tenant: Tenant | None = None) -> str:
        """The served name; 404 when the client asked for another model, 403 when the
        tenant may not use it, 429 when the tenant's rpm or daily budget is spent."""
        if requested is None or requested == self.model_name:
            self.tenancy.check_model(tenant, self.model_name)
            self.tenancy.precheck(tenant)
            return self.model_name
        raise APIError(
            404,
            f"model {clip(requested, 64)!r} is not served here; this server serves "
            f"{self.model_name!r} (see GET /v1/models)",
            param="model",
            code="model_not_found",
        )


def get_state(request: Request) -> ServingState:
    return request.app.state.serving


async def caller(request: Request) -> Tenant | None:
    """The tenant whose key the request carries; None when authentication is off."""
    headers = request.headers
    key = key_from_headers(headers.get("authorization"), headers.get("x-api-key"))
    tenant = await get_state(request).tenancy.identify(key)
    if tenant is not None and (exchange := exchange_of(request)) is not None:
        exchange.tenant = tenant.name  # for the access log line
    return tenant


async def _disconnected(request: Request) -> None:
    # The body was already read, so the next ASGI message is the disconnect.
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def collect(generation: Generation, request: Request) -> list[RequestOutput]:
    """Wait for every choice to finish; a client that hangs up aborts the generation so its
    KV blocks are freed at once instead of after ``max_tokens``."""
    finished = asyncio.ensure_future(generation.final())
    gone = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({finished, gone}, return_when=asyncio.FIRST_COMPLETED)
        if finished.done():
            return finished.result()
        raise APIError(
            499,
            "client closed the connection before the response was ready",
            code="client_disconnected",
        )
    finally:
        finished.cancel()
        gone.cancel()
        generation.close()
