"""The tables as the store queries them; ``migrations/`` creates and changes them.

A change here needs a new migration in ``migrations/versions`` (see ``migrations/env.py``).
"""

from __future__ import annotations

from sqlalchemy import (
    JSON,
    BigInteger,
    Column,
    Date,
    DateTime,
    Float,
    ForeignKey,
    Integer,
    MetaData,
    String,
    Table,
)

__all__ = ["VERSION_TABLE", "api_keys", "daily_usage", "metadata", "tenants"]

VERSION_TABLE = "autoglm_alembic_version"
"""Alembic's bookkeeping table, named so that it cannot clash with another application's."""

metadata = MetaData()

tenants = Table(
    "tenants",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("name", String(64), nullable=False, unique=True),
    Column("rpm", BigInteger),
    Column("tpm", BigInteger),
    Column("max_concurrent", BigInteger),
    Column("max_queued", BigInteger),
    Column("weight", Float, nullable=False),
    Column("max_priority", BigInteger),
    Column("models", JSON(none_as_null=True)),
    Column("daily_tokens", BigInteger),
    Column("created_at", DateTime(timezone=True), nullable=False),
)

api_keys = Table(
    "api_keys",
    metadata,
    Column("key_id", String(16), primary_key=True),
    Column(
        "tenant_id",
        Integer,
        ForeignKey("tenants.id", ondelete="CASCADE"),
        nullable=False,
        index=True,
    ),
    Column("digest", String(64), nullable=False),  # hex SHA-256 of the whole key text
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("expires_at", DateTime(timezone=True)),
    Column("revoked_at", DateTime(timezone=True)),
)

# Keyed by tenant name, not id: usage outlives a deleted tenant.
daily_usage = Table(
    "daily_usage",
    metadata,
    Column("tenant", String(64), primary_key=True),
    Column("model", String(255), primary_key=True),
    Column("day", Date, primary_key=True),
    Column("requests", BigInteger, nullable=False),
    Column("prompt_tokens", BigInteger, nullable=False),
    Column("cached_tokens", BigInteger, nullable=False),
    Column("completion_tokens", BigInteger, nullable=False),
    Column("errors", BigInteger, nullable=False),
)
