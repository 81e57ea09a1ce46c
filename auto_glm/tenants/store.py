"""TenantStore: tenants, API keys and daily usage in SQLite (the default) or PostgreSQL."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from datetime import date, datetime, timedelta, timezone
from typing import Any

from sqlalchemy import Row, and_, exc, func, or_, select
from sqlalchemy.dialects import postgresql, sqlite

from auto_glm.tenants import keys
from auto_glm.tenants.database import Database
from auto_glm.tenants.errors import AuthError, TenantStoreError
from auto_glm.tenants.models import (
    COUNTERS,
    KeyInfo,
    Tenant,
    TenantLimits,
    UsageDelta,
    UsageRow,
    check_tenant_name,
    utc_now,
)
from auto_glm.tenants.schema import api_keys, daily_usage, tenants

__all__ = ["TenantStore"]

_LIMITS = TenantLimits.field_names()
_LONGEST_EXPIRY = timedelta(days=36500)
_SHORTEST_EXPIRY = timedelta(minutes=1)  # a key expired by the time it is stored is a mistake
_KEY_COLUMNS = (  # labelled apart from the tenants columns that authenticate also reads
    api_keys.c.key_id,
    tenants.c.name.label("key_tenant"),
    api_keys.c.created_at.label("key_created_at"),
    api_keys.c.expires_at,
    api_keys.c.revoked_at,
)


def _utc(moment: datetime | None) -> datetime | None:
    # SQLite returns the stored UTC times without a zone, PostgreSQL in the session's zone.
    if moment is None:
        return None
    if moment.tzinfo is None:
        return moment.replace(tzinfo=timezone.utc)
    return moment.astimezone(timezone.utc)


def _limit_values(limits: TenantLimits) -> dict[str, Any]:
    values = dataclasses.asdict(limits)
    values["models"] = list(limits.models) if limits.models is not None else None
    return values


def _tenant(row: Row[Any]) -> Tenant:
    values = {name: getattr(row, name) for name in _LIMITS}
    values["models"] = tuple(row.models) if row.models is not None else None
    return Tenant(row.name, TenantLimits(**values), _utc(row.created_at))


def _key(row: Row[Any]) -> KeyInfo:
    return KeyInfo(
        row.key_id,
        row.key_tenant,
        _utc(row.key_created_at),
        _utc(row.expires_at),
        _utc(row.revoked_at),
    )


def _unknown_tenant(name: str) -> TenantStoreError:
    return TenantStoreError(
        f"unknown tenant {name!r}: `autoglm tenants list` shows the existing ones"
    )


class TenantStore(Database):
    """Tenants, keys and usage in the database at ``url`` (default:
    :func:`default_database_url`), created or migrated to the current schema on open.

    Every method is safe to call from several threads; each is one transaction.
    """

    def __init__(self, url: str | None = None) -> None:
        super().__init__(url)

    # Tenants

    def create_tenant(self, name: str, limits: TenantLimits = TenantLimits()) -> Tenant:
        """Add tenant ``name`` with ``limits``; the name must be new."""
        check_tenant_name(name)
        created = utc_now()
        try:
            with self.transaction() as db:
                db.execute(
                    tenants.insert().values(name=name, created_at=created, **_limit_values(limits))
                )
        except exc.IntegrityError:
            raise TenantStoreError(
                f"tenant {name!r} already exists: choose another name, or change its limits "
                f"with `autoglm tenants update {name}`"
            ) from None
        return Tenant(name, limits, created)

    def get_tenant(self, name: str) -> Tenant:
        """The tenant called ``name``."""
        with self.transaction() as db:
            row = db.execute(select(tenants).where(tenants.c.name == name)).first()
        if row is None:
            raise _unknown_tenant(name)
        return _tenant(row)

    def list_tenants(self) -> list[Tenant]:
        """Every tenant, by name."""
        with self.transaction() as db:
            rows = db.execute(select(tenants).order_by(tenants.c.name)).all()
        return [_tenant(row) for row in rows]

    def update_tenant(self, name: str, **changes: Any) -> Tenant:
        """Change some of the tenant's limits (keyword names are :class:`TenantLimits` fields)."""
        unknown = sorted(set(changes) - set(_LIMITS))
        if unknown:
            raise TenantStoreError(
                f"unknown limit {', '.join(unknown)}: the limits are {', '.join(_LIMITS)}"
            )
        values = _limit_values(TenantLimits(**changes))  # validates the changed values
        with self.transaction() as db:
            if changes:
                update = {field: values[field] for field in changes}
                db.execute(tenants.update().where(tenants.c.name == name).values(**update))
            row = db.execute(select(tenants).where(tenants.c.name == name)).first()
        if row is None:
            raise _unknown_tenant(name)
        return _tenant(row)

    def delete_tenant(self, name: str) -> None:
        """Remove the tenant and its keys; its usage rows stay."""
        with self.transaction() as db:
            # locked first (PostgreSQL; SQLite writes one at a time), so a key being added
            # meanwhile waits, and then finds no tenant, instead of outliving the key delete
            tenant_id = db.execute(
                select(tenants.c.id).where(tenants.c.name == name).with_for_update()
            ).scalar()
            if tenant_id is None:
                raise _unknown_tenant(name)
            db.execute(api_keys.delete().where(api_keys.c.tenant_id == tenant_id))
            db.execute(tenants.delete().where(tenants.c.id == tenant_id))

    # Keys

    def create_key(self, tenant: str, expires_in: timedelta | None = None) -> tuple[KeyInfo, str]:
        """A new key for ``tenant``: its info and its text, which only this call returns."""
        if expires_in is not None and not _SHORTEST_EXPIRY <= expires_in <= _LONGEST_EXPIRY:
            raise TenantStoreError(
                f"expiry {expires_in} is invalid: a key must expire in the future, at least a "
                f"minute and within {_LONGEST_EXPIRY.days} days from now, or never "
                "(expires_in_days in the admin API, --expires on the command line)"
            )
        key_id, key = keys.new_key()
        created = utc_now()
        expires = created + expires_in if expires_in is not None else None
        try:
            with self.transaction() as db:
                tenant_id = db.execute(
                    select(tenants.c.id).where(tenants.c.name == tenant)
                ).scalar()
                if tenant_id is None:
                    raise _unknown_tenant(tenant)
                db.execute(
                    api_keys.insert().values(
                        key_id=key_id,
                        tenant_id=tenant_id,
                        digest=keys.digest(key),
                        created_at=created,
                        expires_at=expires,
                    )
                )
        except exc.IntegrityError:  # the tenant was deleted since it was looked up
            raise _unknown_tenant(tenant) from None
        return KeyInfo(key_id, tenant, created, expires, None), key

    def list_keys(self, tenant: str | None = None) -> list[KeyInfo]:
        """The keys of ``tenant`` (default: of every tenant), oldest first."""
        query = select(*_KEY_COLUMNS).join(tenants, tenants.c.id == api_keys.c.tenant_id)
        with self.transaction() as db:
            if tenant is not None:
                if db.execute(select(tenants.c.id).where(tenants.c.name == tenant)).first() is None:
                    raise _unknown_tenant(tenant)
                query = query.where(tenants.c.name == tenant)
            rows = db.execute(query.order_by(api_keys.c.created_at, api_keys.c.key_id)).all()
        return [_key(row) for row in rows]

    def revoke_key(self, key_id: str) -> KeyInfo:
        """Revoke the key for good (a whole key is accepted too); revoking twice is harmless."""
        key_id = keys.key_id_of(key_id)
        with self.transaction() as db:
            db.execute(
                api_keys.update()
                .where(api_keys.c.key_id == key_id, api_keys.c.revoked_at.is_(None))
                .values(revoked_at=utc_now())
            )
            row = db.execute(
                select(*_KEY_COLUMNS)
                .join(tenants, tenants.c.id == api_keys.c.tenant_id)
                .where(api_keys.c.key_id == key_id)
            ).first()
        if row is None:
            raise TenantStoreError(
                f"unknown key id {keys.shown_key_id(key_id)}: `autoglm keys list` shows the key ids"
            )
        return _key(row)

    def has_keys(self) -> bool:
        """Whether any key is active (neither revoked nor expired)."""
        query = select(api_keys.c.key_id).where(
            api_keys.c.revoked_at.is_(None),
            or_(api_keys.c.expires_at.is_(None), api_keys.c.expires_at > utc_now()),
        )
        with self.transaction() as db:
            return db.execute(query.limit(1)).first() is not None

    def authenticate(self, key: str | None) -> tuple[Tenant, KeyInfo]:
        """The tenant and key that ``key`` belongs to, or :class:`AuthError` saying why not.

        One query by the key id (the primary key); the digest is compared in constant time.
        :class:`TenantStoreError` means the database could not be asked, not a bad key.
        """
        key_id = keys.parse_key(key)
        query = (
            select(tenants, api_keys.c.digest, *_KEY_COLUMNS)
            .join(api_keys, tenants.c.id == api_keys.c.tenant_id)
            .where(api_keys.c.key_id == key_id)
        )
        with self.transaction() as db:
            row = db.execute(query).first()
        shown = f"{keys.PREFIX}{key_id}_..."
        if row is None or not keys.digest_matches(key, row.digest):
            raise AuthError("unknown", f"API key {shown} is not valid")
        info = _key(row)
        if info.revoked_at is not None:
            raise AuthError("revoked", f"API key {shown} has been revoked")
        if info.expires_at is not None and info.expires_at <= utc_now():
            raise AuthError(
                "expired", f"API key {shown} expired at {info.expires_at:%Y-%m-%d %H:%M} UTC"
            )
        return _tenant(row), info

    # Usage

    def add_usage(self, deltas: Sequence[UsageDelta]) -> None:
        """Add ``deltas`` to their tenant/model/day rows in one transaction.

        An upsert adds in the database, so concurrent writers (threads or processes) never
        lose counts; rows are written in key order so that two writers cannot deadlock.
        """
        merged: dict[tuple[str, str, date], UsageDelta] = {}
        for delta in deltas:
            merged[delta.key] = merged[delta.key] + delta if delta.key in merged else delta
        if not merged:
            return
        rows = [dataclasses.asdict(merged[key]) for key in sorted(merged)]
        with self.transaction() as db:
            dialect = postgresql if db.dialect.name == "postgresql" else sqlite
            insert = dialect.insert(daily_usage)
            upsert = insert.on_conflict_do_update(
                index_elements=[daily_usage.c.tenant, daily_usage.c.model, daily_usage.c.day],
                set_={name: daily_usage.c[name] + insert.excluded[name] for name in COUNTERS},
            )
            for row in rows:  # one statement per row keeps the lock order
                db.execute(upsert, row)

    def usage(self, tenant: str | None = None, since: date | None = None) -> list[UsageRow]:
        """Usage rows by day, tenant and model; of one tenant, from one day on, if given."""
        query = select(daily_usage)
        if tenant is not None:
            query = query.where(daily_usage.c.tenant == tenant)
        if since is not None:
            query = query.where(daily_usage.c.day >= since)
        query = query.order_by(daily_usage.c.day, daily_usage.c.tenant, daily_usage.c.model)
        with self.transaction() as db:
            return [UsageRow(**row._mapping) for row in db.execute(query)]

    def tokens_used(self, tenant: str, day: date) -> int:
        """Prompt plus completion tokens of ``tenant`` on ``day``, over every model."""
        total = func.coalesce(
            func.sum(daily_usage.c.prompt_tokens + daily_usage.c.completion_tokens), 0
        )
        query = select(total).where(and_(daily_usage.c.tenant == tenant, daily_usage.c.day == day))
        with self.transaction() as db:
            return int(db.execute(query).scalar_one())
