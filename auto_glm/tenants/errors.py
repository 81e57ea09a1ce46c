"""How tenants are refused: the store (bad input or an unusable database), a bad key, a
call over one of the tenant's limits, and limits that cannot be checked now."""

from __future__ import annotations

from typing import Literal

__all__ = ["AuthError", "AuthFailure", "QuotaExceeded", "QuotaUnavailable", "TenantStoreError"]

AuthFailure = Literal["missing", "malformed", "unknown", "revoked", "expired"]


class TenantStoreError(ValueError):
    """A request the store cannot carry out; the message names the problem and the fix."""


class AuthError(Exception):
    """An API key was refused; ``reason`` says why. The message never contains the key."""

    def __init__(self, reason: AuthFailure, message: str) -> None:
        super().__init__(message)
        self.reason: AuthFailure = reason


class QuotaExceeded(Exception):
    """A call would pass one of the tenant's limits; ``limit`` names it, ``retry_after`` is
    in whole seconds, None where the call alone is over the limit (waiting never helps)."""

    def __init__(self, limit: str, message: str, retry_after: int | None) -> None:
        super().__init__(message)
        self.limit = limit
        self.retry_after = retry_after


class QuotaUnavailable(Exception):
    """The tenant's limits cannot be checked now (where they are kept cannot be reached):
    the call is refused, never let through unchecked. The message says so and to retry."""
