"""Tenants and their limits: create, read, update, delete, and the values refused."""

from __future__ import annotations

import math
from datetime import date, datetime, timedelta, timezone

import pytest

from auto_glm.tenants import AuthError, TenantLimits, TenantStore, TenantStoreError, UsageDelta

FULL = TenantLimits(
    rpm=60,
    tpm=10_000,
    max_concurrent=4,
    max_queued=8,
    weight=2.5,
    max_priority=-3,
    models=("glm-4", "qwen3"),
    daily_tokens=5_000_000_000,  # beyond 32 bits
)


def test_a_tenant_keeps_every_limit(store: TenantStore) -> None:
    before = datetime.now(timezone.utc)
    created = store.create_tenant("acme.prod_1-a", FULL)
    assert created.limits == FULL
    assert before - timedelta(seconds=1) <= created.created_at <= datetime.now(timezone.utc)
    assert store.get_tenant("acme.prod_1-a") == created
    assert store.get_tenant("acme.prod_1-a").created_at.tzinfo == timezone.utc


def test_default_limits_are_unlimited(store: TenantStore) -> None:
    tenant = store.create_tenant("free")
    assert tenant.limits == TenantLimits(
        rpm=None,
        tpm=None,
        max_concurrent=None,
        max_queued=None,
        weight=1.0,
        max_priority=None,
        models=None,
        daily_tokens=None,
    )
    assert store.get_tenant("free").limits == tenant.limits


def test_tenants_are_listed_by_name(store: TenantStore) -> None:
    for name in ("zeta", "alpha", "Mid"):
        store.create_tenant(name)
    assert [t.name for t in store.list_tenants()] == ["Mid", "alpha", "zeta"]


def test_a_duplicate_name_is_refused(store: TenantStore) -> None:
    store.create_tenant("acme")
    with pytest.raises(TenantStoreError, match="tenant 'acme' already exists: choose another"):
        store.create_tenant("acme", FULL)
    assert store.get_tenant("acme").limits == TenantLimits()


@pytest.mark.parametrize("name", ["", "a b", "x" * 65, "ünï", "a/b", "a,b", ".", ".."])
def test_bad_names_are_refused(store: TenantStore, name: str) -> None:
    with pytest.raises(TenantStoreError, match="invalid tenant name .*: use 1 to 64 characters"):
        store.create_tenant(name)


def test_an_unknown_tenant_says_how_to_list_them(store: TenantStore) -> None:
    for call in (
        lambda: store.get_tenant("ghost"),
        lambda: store.update_tenant("ghost", rpm=1),
        lambda: store.delete_tenant("ghost"),
        lambda: store.create_key("ghost"),
        lambda: store.list_keys("ghost"),
    ):
        with pytest.raises(TenantStoreError, match="unknown tenant 'ghost': `autoglm tenants"):
            call()


def test_update_changes_only_the_named_limits(store: TenantStore) -> None:
    store.create_tenant("acme", FULL)
    updated = store.update_tenant("acme", rpm=None, models=["glm-4"], weight=1)
    expected = TenantLimits(**{**vars(FULL), "rpm": None, "models": ("glm-4",), "weight": 1.0})
    assert updated.limits == expected
    assert store.get_tenant("acme").limits == expected


def test_update_refuses_unknown_fields_and_bad_values(store: TenantStore) -> None:
    store.create_tenant("acme", FULL)
    with pytest.raises(TenantStoreError, match="unknown limit colour: the limits are rpm, tpm"):
        store.update_tenant("acme", colour="red")
    with pytest.raises(TenantStoreError, match="limit tpm=0 is invalid"):
        store.update_tenant("acme", tpm=0)
    assert store.get_tenant("acme").limits == FULL


def test_delete_removes_the_keys_but_keeps_the_usage(store: TenantStore) -> None:
    store.create_tenant("acme")
    _, key = store.create_key("acme")
    store.add_usage([UsageDelta("acme", "m", date(2026, 3, 4), requests=2)])
    store.delete_tenant("acme")
    assert store.list_tenants() == []
    assert store.list_keys() == []
    with pytest.raises(AuthError) as caught:
        store.authenticate(key)
    assert caught.value.reason == "unknown"
    assert [row.requests for row in store.usage("acme")] == [2]
    store.create_tenant("acme")  # the name is free again, with no keys
    assert store.list_keys("acme") == []


@pytest.mark.parametrize(
    ("limits", "message"),
    [
        ({"rpm": 0}, "limit rpm=0 is invalid: use a positive whole number"),
        ({"tpm": -5}, "limit tpm=-5 is invalid"),
        ({"max_concurrent": 1.5}, "limit max_concurrent=1.5 is invalid"),
        ({"max_queued": True}, "limit max_queued=True is invalid"),
        ({"daily_tokens": "10"}, "limit daily_tokens='10' is invalid"),
        ({"max_priority": 0.5}, "limit max_priority=0.5 is invalid: use a whole number"),
        # past what the database holds: an OverflowError from SQLite, a 500 from the admin API
        ({"tpm": 2**63}, f"limit tpm={2**63} is invalid: use a positive whole number up to"),
        ({"daily_tokens": 2**70}, "limit daily_tokens=.* is invalid"),
        ({"max_priority": 2**31}, "max_priority=2147483648 is invalid: .* from -2147483648 to"),
        ({"weight": 0}, "limit weight=0 is invalid: use a positive number"),
        ({"weight": math.nan}, "limit weight=nan is invalid"),
        ({"weight": None}, "limit weight=None is invalid"),
        ({"models": ()}, r"limit models=\(\) is invalid: list one or more model names"),
        ({"models": ("a,b",)}, "limit models=.* is invalid"),
        ({"models": ("",)}, "limit models=.* is invalid"),
        ({"models": ("\x00",)}, "limit models=.* is invalid: .*printable"),
        ({"models": ("m" * 100_000,)}, r"limit models=\('mmm.*\.\.\. \(100005 characters\)"),
    ],
)
def test_bad_limits_are_refused(limits: dict[str, object], message: str) -> None:
    with pytest.raises(TenantStoreError, match=message):
        TenantLimits(**limits)  # type: ignore[arg-type]


def test_limits_accept_a_list_or_one_model_name() -> None:
    assert TenantLimits(models=["a", "b"]).models == ("a", "b")  # type: ignore[arg-type]
    assert TenantLimits(models="a").models == ("a",)  # type: ignore[arg-type]
    assert TenantLimits(max_priority=-1, weight=3).weight == 3.0
