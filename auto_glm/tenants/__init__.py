"""Tenants, their API keys, limits and usage, kept in SQLite or PostgreSQL.

:class:`TenantStore` is the storage (schema migrations applied on open);
:class:`UsageRecorder` batches the server's usage counts into it; ``autoglm tenants``,
``autoglm keys`` and ``autoglm usage`` (:mod:`auto_glm.tenants.cli`) manage it.
"""

from auto_glm.tenants.database import default_database_url
from auto_glm.tenants.errors import AuthError, TenantStoreError
from auto_glm.tenants.models import KeyInfo, Tenant, TenantLimits, UsageDelta, UsageRow
from auto_glm.tenants.recorder import UsageRecorder
from auto_glm.tenants.store import TenantStore

__all__ = [
    "AuthError",
    "KeyInfo",
    "Tenant",
    "TenantLimits",
    "TenantStore",
    "TenantStoreError",
    "UsageDelta",
    "UsageRecorder",
    "UsageRow",
    "default_database_url",
]
