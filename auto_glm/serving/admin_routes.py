"""``/admin``: tenants, their API keys and usage over REST, for the holder of ``admin_key``.

The same operations as ``autoglm tenants``, ``autoglm keys`` and ``autoglm usage``, on the
server's own store. Store calls run in a worker thread: the database may be remote.
"""

from __future__ import annotations

import asyncio
from datetime import date, timedelta

from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel, ConfigDict, Field

from auto_glm.serving.errors import ERROR_RESPONSES, APIError
from auto_glm.serving.state import get_state
from auto_glm.serving.tenancy import key_from_headers
from auto_glm.tenants import KeyInfo, Tenant, TenantLimits, TenantStoreError, UsageRow

__all__ = ["require_admin", "router"]


async def require_admin(request: Request) -> None:
    headers = request.headers
    get_state(request).tenancy.check_admin(
        key_from_headers(headers.get("authorization"), headers.get("x-api-key"))
    )


router = APIRouter(
    prefix="/admin",
    tags=["Admin"],
    dependencies=[Depends(require_admin)],
    responses=ERROR_RESPONSES,
)


class LimitsBody(BaseModel):
    """Limits of a tenant; omitted fields are unlimited (create) or unchanged (update)."""

    model_config = ConfigDict(extra="forbid", strict=True)  # true is not 1, "5" not 5

    rpm: int | None = Field(None, gt=0, description="Requests per minute")
    tpm: int | None = Field(None, gt=0, description="Tokens per minute (prompt + max_tokens)")
    max_concurrent: int | None = Field(None, gt=0, description="Requests in flight at once")
    max_queued: int | None = Field(None, gt=0, description="Requests waiting at once")
    weight: float | None = Field(None, gt=0, description="Share of the engine when tenants compete")
    max_priority: int | None = Field(None, description="Most urgent priority it may ask for")
    models: list[str] | None = Field(None, description="Served model names it may use")
    daily_tokens: int | None = Field(None, gt=0, description="Tokens per UTC day")


class TenantCreate(LimitsBody):
    name: str = Field(description="1-64 characters of A-Z a-z 0-9 . _ -")


class KeyCreate(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    expires_in_days: float | None = Field(None, gt=0, le=36500, description="Empty: never")


class NewKey(BaseModel):
    key: str = Field(description="The API key; shown this once, stored only as a digest")
    info: dict


def _limits(body: LimitsBody) -> dict:
    found = body.model_dump(exclude_unset=True)
    if found.get("models") is not None:
        found["models"] = tuple(found["models"])
    return found


def _tenant(tenant: Tenant) -> dict:
    limits = tenant.limits
    return {
        "name": tenant.name,
        "created_at": tenant.created_at.isoformat(),
        "limits": {
            name: list(value) if isinstance(value, tuple) else value
            for name, value in vars(limits).items()
        },
    }


def _key(info: KeyInfo) -> dict:
    return {
        "key_id": info.key_id,
        "tenant": info.tenant,
        "created_at": info.created_at.isoformat(),
        "expires_at": info.expires_at.isoformat() if info.expires_at else None,
        "revoked_at": info.revoked_at.isoformat() if info.revoked_at else None,
        "active": info.active,
    }


def _usage(row: UsageRow) -> dict:
    return {**vars(row), "day": row.day.isoformat()}


async def _call(request: Request, method: str, *args, **kwargs):
    store = get_state(request).tenancy.store
    try:
        return await asyncio.to_thread(getattr(store, method), *args, **kwargs)
    except TenantStoreError as exc:
        missing = "unknown tenant" in str(exc) or "unknown key" in str(exc)
        raise APIError(404 if missing else 400, str(exc), code="tenant_store_error") from None


@router.get("/tenants", summary="List tenants")
async def list_tenants(request: Request) -> list[dict]:
    return [_tenant(t) for t in await _call(request, "list_tenants")]


@router.post("/tenants", status_code=201, summary="Create a tenant")
async def create_tenant(body: TenantCreate, request: Request) -> dict:
    limits = _limits(body)
    limits.pop("name")
    try:
        parsed = TenantLimits(**limits)
    except TenantStoreError as exc:
        raise APIError(400, str(exc), code="tenant_store_error") from None
    return _tenant(await _call(request, "create_tenant", body.name, parsed))


@router.get("/tenants/{name}", summary="Show a tenant")
async def show_tenant(name: str, request: Request) -> dict:
    return _tenant(await _call(request, "get_tenant", name))


@router.patch("/tenants/{name}", summary="Change a tenant's limits")
async def update_tenant(name: str, body: LimitsBody, request: Request) -> dict:
    return _tenant(await _call(request, "update_tenant", name, **_limits(body)))


@router.delete("/tenants/{name}", status_code=204, summary="Delete a tenant and its keys")
async def delete_tenant(name: str, request: Request) -> None:
    await _call(request, "delete_tenant", name)


@router.post("/tenants/{name}/keys", status_code=201, summary="Create an API key")
async def create_key(name: str, body: KeyCreate, request: Request) -> NewKey:
    expires = None if body.expires_in_days is None else timedelta(days=body.expires_in_days)
    info, key = await _call(request, "create_key", name, expires)
    return NewKey(key=key, info=_key(info))


@router.get("/keys", summary="List API keys (never the keys themselves)")
async def list_keys(request: Request, tenant: str | None = None) -> list[dict]:
    return [_key(k) for k in await _call(request, "list_keys", tenant)]


@router.delete("/keys/{key_id}", summary="Revoke an API key")
async def revoke_key(key_id: str, request: Request) -> dict:
    return _key(await _call(request, "revoke_key", key_id))


@router.get("/usage", summary="Usage per tenant, model and UTC day")
async def usage(request: Request, tenant: str | None = None, since: date | None = None) -> list:
    state = get_state(request)
    await asyncio.to_thread(state.tenancy.recorder.flush)  # include what is not written yet
    return [_usage(row) for row in await _call(request, "usage", tenant, since)]
