"""The values the tenant store hands out: tenants with their limits, keys and usage counts."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, fields
from datetime import date, datetime, timezone

from auto_glm.tenants.errors import TenantStoreError

__all__ = [
    "COUNTERS",
    "KeyInfo",
    "Tenant",
    "TenantLimits",
    "UsageDelta",
    "UsageRow",
    "check_tenant_name",
    "utc_now",
]

_NAME = re.compile(r"[A-Za-z0-9._-]{1,64}")
_COUNTS = ("rpm", "tpm", "max_concurrent", "max_queued", "daily_tokens")
COUNTERS = ("requests", "prompt_tokens", "cached_tokens", "completion_tokens", "errors")
"""The counted fields of :class:`UsageRow` and :class:`UsageDelta`."""


def utc_now() -> datetime:
    """The current time, timezone-aware in UTC: every time the store keeps is in UTC."""
    return datetime.now(timezone.utc)


def check_tenant_name(name: str) -> str:
    """Return ``name`` if it is a valid tenant name, else raise :class:`TenantStoreError`."""
    if not isinstance(name, str) or not _NAME.fullmatch(name) or name in (".", ".."):
        raise TenantStoreError(
            f"invalid tenant name {name!r}: use 1 to 64 characters from A-Z, a-z, 0-9, '.', "
            "'_' and '-', other than '.' and '..' (which URLs cannot hold)"
        )
    return name


_MOST = 2**63 - 1  # a count the database holds (BIGINT; SQLite's INTEGER)
_LONGEST_MODEL_NAME = 256


def _shortened(value: object) -> str:
    """``repr(value)``, cut to 200 characters for a message."""
    text = repr(value)
    return text if len(text) <= 200 else f"{text[:200]}... ({len(text)} characters)"


_PRIORITIES = (-(2**31), 2**31 - 1)  # a request's priority field, as the API bounds it


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class TenantLimits:
    """What one tenant may use; ``None`` means unlimited (for ``models``: every model).

    ``rpm``/``tpm``: requests and tokens per minute; ``max_concurrent``/``max_queued``:
    requests running and waiting at once; ``weight``: its share when tenants compete;
    ``max_priority``: the most urgent priority it may ask for (the engine serves lower values
    first, so any integer is allowed); ``models``: the served model names it may use;
    ``daily_tokens``: prompt plus completion tokens per UTC day.
    """

    rpm: int | None = None
    tpm: int | None = None
    max_concurrent: int | None = None
    max_queued: int | None = None
    weight: float = 1.0
    max_priority: int | None = None
    models: tuple[str, ...] | None = None
    daily_tokens: int | None = None

    def __post_init__(self) -> None:
        for name in _COUNTS:
            value = getattr(self, name)
            if value is not None and not (_is_int(value) and 0 < value <= _MOST):
                raise TenantStoreError(
                    f"limit {name}={value!r} is invalid: use a positive whole number up to "
                    f"{_MOST}, or leave it unset for no limit"
                )
        low, high = _PRIORITIES
        if self.max_priority is not None and not (
            _is_int(self.max_priority) and low <= self.max_priority <= high
        ):
            raise TenantStoreError(
                f"limit max_priority={self.max_priority!r} is invalid: use a whole number from "
                f"{low} to {high}, or leave it unset for no limit"
            )
        if (
            isinstance(self.weight, bool)
            or not isinstance(self.weight, (int, float))
            or not (math.isfinite(self.weight) and self.weight > 0)
        ):
            raise TenantStoreError(
                f"limit weight={self.weight!r} is invalid: use a positive number (default 1.0)"
            )
        object.__setattr__(self, "weight", float(self.weight))
        if self.models is not None:
            models = (self.models,) if isinstance(self.models, str) else tuple(self.models)
            if not models or not all(
                isinstance(m, str)
                and m.strip() == m
                and 0 < len(m) <= _LONGEST_MODEL_NAME
                and m.isprintable()
                and "," not in m
                for m in models
            ):
                raise TenantStoreError(
                    f"limit models={_shortened(self.models)} is invalid: list one or more model "
                    f"names (printable, up to {_LONGEST_MODEL_NAME} characters, without commas "
                    "or surrounding spaces), or leave it unset for every model"
                )
            object.__setattr__(self, "models", models)

    @property
    def largest_call(self) -> int | None:
        """The most tokens one call can ever reserve: the smaller of ``tpm`` and
        ``daily_tokens`` (None when neither is set)."""
        limits = [n for n in (self.tpm, self.daily_tokens) if n is not None]
        return min(limits) if limits else None

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        """The limit names, in declaration order (what ``update_tenant`` accepts)."""
        return tuple(f.name for f in fields(cls))


@dataclass(frozen=True)
class Tenant:
    """A client organisation: its unique name, its limits, and when it was created."""

    name: str
    limits: TenantLimits
    created_at: datetime


@dataclass(frozen=True)
class KeyInfo:
    """What is known about an API key besides its secret: the id shown in listings."""

    key_id: str
    tenant: str
    created_at: datetime
    expires_at: datetime | None
    revoked_at: datetime | None

    @property
    def active(self) -> bool:
        """Neither revoked nor expired now."""
        return self.revoked_at is None and (self.expires_at is None or self.expires_at > utc_now())


@dataclass(frozen=True)
class UsageRow:
    """One tenant's use of one model on one UTC day, as stored."""

    tenant: str
    model: str
    day: date
    requests: int
    prompt_tokens: int
    cached_tokens: int
    completion_tokens: int
    errors: int


@dataclass(frozen=True)
class UsageDelta:
    """Usage to add to a tenant/model/day row (what the server reports after requests)."""

    tenant: str
    model: str
    day: date
    requests: int = 0
    prompt_tokens: int = 0
    cached_tokens: int = 0
    completion_tokens: int = 0
    errors: int = 0

    def __post_init__(self) -> None:
        for name in COUNTERS:
            value = getattr(self, name)
            if not (_is_int(value) and value >= 0):
                raise TenantStoreError(
                    f"usage {name}={value!r} is invalid: counts are whole numbers, 0 or more"
                )

    @property
    def key(self) -> tuple[str, str, date]:
        """The row this delta adds to."""
        return (self.tenant, self.model, self.day)

    def __add__(self, other: UsageDelta) -> UsageDelta:
        if other.key != self.key:
            raise ValueError(f"cannot add usage for {other.key} to usage for {self.key}")
        sums = {n: getattr(self, n) + getattr(other, n) for n in COUNTERS}
        return UsageDelta(self.tenant, self.model, self.day, **sums)
