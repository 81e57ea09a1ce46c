"""Who is calling, and what they may use: API keys, model lists, priorities, quotas, usage.

The transport-neutral half of authentication: REST (and later gRPC) hand it the key from
their headers. With ``auth`` off every call is anonymous and unlimited. ``auto`` turns
authentication on as soon as the store holds an active key (checked at start and then at
most once a second) and never turns it off again in this process: revoking the last key
must not open the server.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
from typing import Literal

from auto_glm.serving.errors import APIError
from auto_glm.tenants import (
    AuthError,
    Tenant,
    TenantStore,
    TenantStoreError,
    UsageDelta,
    UsageRecorder,
)
from auto_glm.tenants.errors import QuotaUnavailable
from auto_glm.tenants.loads import Load
from auto_glm.tenants.quotas import LocalBook, QuotaBook, QuotaExceeded, Quotas, Reservation

__all__ = ["AuthMode", "Tenancy", "key_from_headers"]

log = logging.getLogger("auto_glm.serving")
AuthMode = Literal["auto", "off", "required"]
_RECHECK_S = 1.0


def key_from_headers(authorization: str | None, api_key: str | None) -> str | None:
    """The key of ``Authorization: Bearer KEY`` or ``x-api-key: KEY``, if any."""
    if authorization:
        scheme, _, token = authorization.strip().partition(" ")
        if scheme.lower() == "bearer" and token.strip():
            return token.strip()
        return authorization.strip()  # malformed: refused by the store with its reason
    return api_key.strip() if api_key else None


def _unauthorized(message: str) -> APIError:
    return APIError(401, message, code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})


class Tenancy:
    """``quotas``: where budgets are kept, this process's own by default."""

    def __init__(
        self,
        store: TenantStore,
        mode: AuthMode,
        admin_key: str | None,
        quotas: QuotaBook | None = None,
    ) -> None:
        self.store = store
        self.mode = mode
        self.admin_key = admin_key
        self.recorder = UsageRecorder(store)
        self.quotas = quotas or LocalBook(Quotas(store.tokens_used))
        self._required = mode == "required" or (mode == "auto" and store.has_keys())
        self._checked_at = time.monotonic()

    @property
    def required(self) -> bool:
        """Whether calls must carry a tenant's key, as last checked (see the module
        docstring for ``auto``)."""
        return self._required

    async def _recheck(self) -> bool:
        if not self._required and self.mode == "auto":
            now = time.monotonic()
            if now - self._checked_at >= _RECHECK_S:
                self._checked_at = now
                self._required = await asyncio.to_thread(self.store.has_keys)
                if self._required:
                    log.info("auth: the store now holds API keys; every call needs one")
        return self._required

    async def identify(self, key: str | None) -> Tenant | None:
        """The calling tenant, or None when authentication is off; raises APIError 401
        (missing, unknown, revoked or expired key) or 503 (the store is unreachable)."""
        if not await self._recheck():
            return None
        if key is None:
            raise _unauthorized(
                "this server needs an API key: send Authorization: Bearer KEY (or x-api-key); "
                "an administrator creates keys with autoglm keys create --tenant NAME"
            )
        try:
            tenant, _ = await asyncio.to_thread(self.store.authenticate, key)
        except AuthError as exc:
            raise _unauthorized(str(exc)) from None
        except TenantStoreError as exc:
            log.error("tenant store unavailable: %s", exc)
            raise APIError(
                503,
                "the tenant store cannot be reached, so API keys cannot be checked; retry "
                "shortly (see the server log)",
                code="store_unavailable",
                headers={"Retry-After": "1"},
            ) from None
        return tenant

    def check_admin(self, key: str | None) -> None:
        """Raise APIError unless ``key`` is the admin key."""
        if self.admin_key is None:
            raise APIError(
                403,
                "the admin API is disabled: start the server with admin_key set "
                "(AUTOGLM_ADMIN_KEY or --admin-key)",
                code="admin_disabled",
            )
        if key is None:
            raise _unauthorized("the admin API needs the admin key: send Authorization: Bearer KEY")
        if not hmac.compare_digest(key.encode(), self.admin_key.encode()):
            raise APIError(
                403,
                "this key may not use the admin API; send the server's admin_key",
                code="admin_key_required",
            )

    @staticmethod
    def check_model(tenant: Tenant | None, model: str) -> None:
        allowed = tenant.limits.models if tenant is not None else None
        if allowed is not None and model not in allowed:
            raise APIError(
                403,
                f"tenant {tenant.name!r} may not use model {model!r}; its models are "
                f"{', '.join(allowed) or 'none'} (ask an administrator: autoglm tenants "
                "update NAME --models ...)",
                param="model",
                code="model_not_allowed",
            )

    @staticmethod
    def priority(tenant: Tenant | None, requested: int) -> int:
        """``requested``, raised to the tenant's ``max_priority`` (lower runs first)."""
        limit = tenant.limits.max_priority if tenant is not None else None
        return requested if limit is None else max(requested, limit)

    def rate_headers(self, tenant: Tenant | None) -> dict[str, str]:
        return {} if tenant is None else self.quotas.state(tenant).headers()

    def _too_many(self, tenant: Tenant, exc: QuotaExceeded) -> APIError:
        if exc.retry_after is None:  # a retry would be refused alike: the request's fault
            return APIError(
                400,
                str(exc),
                param="max_tokens",
                code="request_too_large",
                headers=self.rate_headers(tenant),
            )
        headers = {**self.rate_headers(tenant), "Retry-After": str(exc.retry_after)}
        return APIError(429, str(exc), code=f"{exc.limit}_exceeded", headers=headers)

    @staticmethod
    def _unavailable(exc: QuotaUnavailable) -> APIError:
        return APIError(503, str(exc), code="quota_unavailable", headers={"Retry-After": "1"})

    async def precheck(self, tenant: Tenant | None) -> None:
        """Refuse (429) a call whose rpm or daily budget is spent, before any work (503
        when the budgets cannot be checked)."""
        if tenant is not None:
            try:
                await self.quotas.check_requests(tenant)
            except QuotaExceeded as exc:
                raise self._too_many(tenant, exc) from None
            except QuotaUnavailable as exc:
                raise self._unavailable(exc) from exc

    async def reserve(
        self, tenant: Tenant | None, tokens: int, load: Load, choices: int
    ) -> Reservation | None:
        """Hold ``tokens`` for a call of ``choices`` on top of the tenant's ``load`` on this
        server, or raise APIError 429 naming the limit it would pass (503 when the limits
        cannot be checked)."""
        if tenant is None:
            return None
        try:
            return await self.quotas.reserve(tenant, tokens, load, choices)
        except QuotaExceeded as exc:
            raise self._too_many(tenant, exc) from None
        except QuotaUnavailable as exc:
            raise self._unavailable(exc) from exc

    def finish(self, reservation: Reservation | None, usage: UsageDelta) -> None:
        """A tenant's call ended: give back unused reserved tokens and record its usage."""
        if reservation is not None:
            self.quotas.settle(reservation, usage.prompt_tokens + usage.completion_tokens)
        self.recorder.add(usage)

    def close(self) -> None:
        self.recorder.close()
        self.store.close()
