"""The two ways the tenant store refuses: bad input or an unusable database, and a bad key."""

from __future__ import annotations

from typing import Literal

__all__ = ["AuthError", "AuthFailure", "TenantStoreError"]

AuthFailure = Literal["missing", "malformed", "unknown", "revoked", "expired"]


class TenantStoreError(ValueError):
    """A request the store cannot carry out; the message names the problem and the fix."""


class AuthError(Exception):
    """An API key was refused; ``reason`` says why. The message never contains the key."""

    def __init__(self, reason: AuthFailure, message: str) -> None:
        super().__init__(message)
        self.reason: AuthFailure = reason
