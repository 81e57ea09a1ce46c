"""What every handler needs: the model table, the settings, admission, tokenizing, tenancy;
``caller``, the dependency that says which tenant is calling; and ``route``, which picks the
served version a call runs on."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

from fastapi import Request

from auto_glm.engine.outputs import RequestOutput
from auto_glm.fleet import Lease, ModelTable, ModelUnavailable
from auto_glm.observability.exchange import Exchange, exchange_of
from auto_glm.serving.admission import Admission
from auto_glm.serving.config import ServerConfig
from auto_glm.serving.errors import VERSION_HEADER, APIError, clip
from auto_glm.serving.generation import Generation
from auto_glm.serving.preprocess import Preprocessor
from auto_glm.serving.tenancy import Tenancy, key_from_headers
from auto_glm.tenants import Tenant

__all__ = [
    "ServingState",
    "caller",
    "collect",
    "get_state",
    "not_served",
]


def not_served(name: str, served: Iterable[str]) -> APIError:
    """404 for a model this server does not serve, naming the ones it does."""
    return APIError(
        404,
        f"model {clip(name, 64)!r} is not served here; this server serves "
        f"{', '.join(map(repr, served))} (see GET /v1/models)",
        param="model",
        code="model_not_found",
    )


@dataclass
class ServingState:
    table: ModelTable
    config: ServerConfig
    admission: Admission
    preprocessor: Preprocessor
    tenancy: Tenancy
    # when the server started: the `created` of /v1/models (responses carry their own time)
    loaded_at: int = field(default_factory=lambda: int(time.time()))

    @property
    def model_name(self) -> str:
        """The model of calls that name none."""
        return self.table.default_model

    @asynccontextmanager
    async def routed(
        self,
        requested: str | None,
        tenant: Tenant | None,
        exchange: Exchange | None,
        user: str | None = None,
    ) -> AsyncIterator[Lease]:
        """:meth:`route` a call that the block prepares (fetches its images, tokenizes its
        prompt); hand the lease to :meth:`Admission.start` right after the block. Until
        then the call counts as in flight, so a drain waits for it, and its lease is
        released if the block fails."""
        with self.admission.preparing():
            lease = await self.route(requested, tenant, exchange, user)
            try:
                yield lease
            except BaseException:
                lease.release()
                raise

    async def route(
        self,
        requested: str | None,
        tenant: Tenant | None,
        exchange: Exchange | None,
        user: str | None = None,
    ) -> Lease:
        """A lease on the version that serves this call: 404 for a model that is not served,
        403 when the tenant may not use it, 429 when its rpm or daily budget is spent, 503
        while draining or when the version cannot be loaded. The caller must hand the lease
        to :meth:`Admission.start` or release it (see :meth:`routed`)."""
        name = requested or self.table.default_model
        if name not in self.table.models:
            raise not_served(name, self.table.models)
        self.tenancy.check_model(tenant, name)
        await self.tenancy.precheck(tenant)
        self.admission.check_open()
        traffic = self.table.models[name].traffic
        sticky = traffic.sticky if traffic is not None else "none"
        key = {"user": user or (tenant and tenant.name), "tenant": tenant and tenant.name}.get(
            sticky
        )
        try:
            lease = await self.table.route(name, key)
        except ModelUnavailable as exc:
            raise APIError(
                503,
                f"{exc}; fix the version (autoglm models verify {exc.ref}) or move its "
                "traffic (PUT /admin/models/{name}/traffic)",
                code="model_unavailable",
            ) from exc
        if exchange is not None:
            exchange.model, exchange.version = lease.model, lease.version
        return lease

    def headers(self, tenant: Tenant | None, lease: Lease) -> dict[str, str]:
        """Headers of every inference response: rate limits and the serving version."""
        return {**self.tenancy.rate_headers(tenant), VERSION_HEADER: lease.version}


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
