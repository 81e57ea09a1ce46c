"""The ``model_versions`` table as the registry queries it.

It lives in the tenant store's database and migration chain: migration
``auto_glm/tenants/migrations/versions/0002_model_registry.py`` creates it, and a change
here needs a new migration there.
"""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    DateTime,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
)

__all__ = ["model_versions"]

metadata = MetaData()

model_versions = Table(
    "model_versions",
    metadata,
    Column("id", Integer, primary_key=True),  # increasing: the newest version is the highest
    Column("name", String(64), nullable=False),
    Column("version", String(64), nullable=False),
    Column("path", Text, nullable=False),  # absolute directory of the files
    Column("source", Text, nullable=False),  # the path or URL it was added from
    Column("copied", Boolean, nullable=False),  # the registry owns (and removes) the files
    Column("architecture", String(255)),
    Column("dtype", String(64)),
    Column("manifest", Text, nullable=False),  # Manifest.to_json()
    Column("signature", Text),  # Sigstore bundle JSON (model_signing), None: unsigned
    Column("signer", String(64)),  # SHA-256 fingerprint of the signer's public key
    Column("total_bytes", BigInteger, nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
    UniqueConstraint("name", "version", name="uq_model_versions_name_version"),
)
