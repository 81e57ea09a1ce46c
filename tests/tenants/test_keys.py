"""API keys: made once, kept as digests, checked in constant time, revoked, expired."""

from __future__ import annotations

import hashlib
import hmac
import re
import threading
from datetime import datetime, timedelta, timezone

import pytest
from sqlalchemy import Engine, text

from auto_glm.tenants import AuthError, TenantLimits, TenantStore, TenantStoreError

KEY = re.compile(r"agk_([A-Za-z0-9]{8})_[A-Za-z0-9_-]{43}")


@pytest.fixture
def acme(store: TenantStore) -> TenantStore:
    store.create_tenant("acme", TenantLimits(rpm=5))
    return store


def _refusal(store: TenantStore, key: str | None) -> AuthError:
    with pytest.raises(AuthError) as caught:
        store.authenticate(key)
    return caught.value


def test_a_new_key_authenticates_as_its_tenant(acme: TenantStore) -> None:
    info, key = acme.create_key("acme")
    match = KEY.fullmatch(key)
    assert match is not None and match.group(1) == info.key_id
    assert info.tenant == "acme" and info.expires_at is None and info.active
    tenant, found = acme.authenticate(key)
    assert tenant == acme.get_tenant("acme")
    assert found == info


def test_keys_are_random_and_listed_without_their_secret(acme: TenantStore) -> None:
    acme.create_tenant("other")
    made = [acme.create_key("acme"), acme.create_key("other"), acme.create_key("acme")]
    assert len({key for _, key in made}) == 3
    assert acme.list_keys() == [info for info, _ in made]
    assert acme.list_keys("acme") == [made[0][0], made[2][0]]


def test_keys_are_stored_only_as_sha256_digests(acme: TenantStore, raw: Engine) -> None:
    info, key = acme.create_key("acme")
    secret = key.removeprefix(f"agk_{info.key_id}_")  # may hold "_" itself (URL-safe base64)
    assert len(secret) >= 43
    with raw.connect() as connection:
        rows = connection.execute(text("SELECT * FROM api_keys")).mappings().all()
    assert len(rows) == 1
    stored = " ".join(str(value) for value in rows[0].values())
    assert key not in stored and secret not in stored
    assert rows[0]["digest"] == hashlib.sha256(key.encode()).hexdigest()
    assert rows[0]["key_id"] == info.key_id


def test_the_digest_is_compared_in_constant_time(
    acme: TenantStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    _, key = acme.create_key("acme")
    calls: list[tuple[str, str]] = []
    original = hmac.compare_digest

    def spy(a: str, b: str) -> bool:
        calls.append((a, b))
        return original(a, b)

    monkeypatch.setattr(hmac, "compare_digest", spy)
    acme.authenticate(key)
    digest = hashlib.sha256(key.encode()).hexdigest()
    assert calls == [(digest, digest)]


def test_a_wrong_secret_with_a_real_id_is_unknown(acme: TenantStore) -> None:
    info, key = acme.create_key("acme")
    forged = f"agk_{info.key_id}_{'A' * 43}"
    error = _refusal(acme, forged)
    assert error.reason == "unknown"
    assert str(error) == f"API key agk_{info.key_id}_... is not valid"


@pytest.mark.parametrize(
    ("key", "reason"),
    [
        (None, "missing"),
        ("", "missing"),
        ("sk-abcdef", "malformed"),
        ("agk_short_" + "A" * 43, "malformed"),
        ("agk_ABCDEFGH_tooshort", "malformed"),
        ("agk_ABCDEFGH_" + "A" * 43 + " ", "malformed"),
        ("agk_ABCDEFGH_" + "A" * 43, "unknown"),
    ],
)
def test_refusals_say_why_without_echoing_the_key(
    acme: TenantStore, key: str | None, reason: str
) -> None:
    error = _refusal(acme, key)
    assert error.reason == reason
    if key:
        assert key.strip() not in str(error) and "A" * 10 not in str(error)


def test_a_revoked_key_is_refused(acme: TenantStore) -> None:
    info, key = acme.create_key("acme")
    revoked = acme.revoke_key(info.key_id)
    assert revoked.revoked_at is not None and not revoked.active
    error = _refusal(acme, key)
    assert error.reason == "revoked"
    assert key not in str(error)
    assert acme.list_keys() == [revoked]
    assert acme.revoke_key(key) == revoked  # again, by the whole key: unchanged


def test_revoking_an_unknown_key_says_how_to_list_them(acme: TenantStore) -> None:
    with pytest.raises(TenantStoreError, match="unknown key id 'nope': `autoglm keys list`"):
        acme.revoke_key("nope")


def test_an_expired_key_is_refused(acme: TenantStore, raw: Engine) -> None:
    info, key = acme.create_key("acme", expires_in=timedelta(days=30))
    assert info.expires_at == info.created_at + timedelta(days=30)
    assert acme.authenticate(key)[1].active
    past = datetime.now(timezone.utc) - timedelta(seconds=1)
    with raw.begin() as connection:
        connection.execute(text("UPDATE api_keys SET expires_at = :past"), {"past": past})
    error = _refusal(acme, key)
    assert error.reason == "expired" and "expired at" in str(error)
    assert not acme.list_keys()[0].active
    assert not acme.has_keys()


@pytest.mark.parametrize(
    "expires_in",
    [timedelta(0), timedelta(seconds=-1), timedelta(36501), timedelta(microseconds=86)],
)
def test_expiry_must_be_from_a_minute_to_a_century(
    acme: TenantStore, expires_in: timedelta
) -> None:
    """(86 us, what expires_in_days=1e-9 gives, made a key expired when it was stored)"""
    with pytest.raises(TenantStoreError, match="at least a minute and within 36500 days"):
        acme.create_key("acme", expires_in=expires_in)
    assert acme.list_keys() == []


def test_has_keys_counts_only_active_keys(acme: TenantStore) -> None:
    assert not acme.has_keys()
    info, _ = acme.create_key("acme")
    assert acme.has_keys()
    acme.revoke_key(info.key_id)
    assert not acme.has_keys()
    acme.create_key("acme", expires_in=timedelta(hours=1))
    assert acme.has_keys()


def test_authenticate_is_safe_from_many_threads(acme: TenantStore) -> None:
    made = [acme.create_key("acme") for _ in range(4)]
    failures: list[BaseException] = []

    def check(info_key: tuple[object, str]) -> None:
        try:
            for _ in range(25):
                assert acme.authenticate(info_key[1])[1] == info_key[0]
        except BaseException as error:  # reported below
            failures.append(error)

    threads = [threading.Thread(target=check, args=(made[i % 4],)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert failures == []


def test_a_pasted_key_revokes_despite_stray_spaces_or_a_damaged_secret(
    acme: TenantStore,
) -> None:
    first, key = acme.create_key("acme")
    assert acme.revoke_key(f" {key}\n").key_id == first.key_id
    second, key = acme.create_key("acme")
    assert acme.revoke_key(key[:-5]).key_id == second.key_id  # the id is enough
    with pytest.raises(TenantStoreError) as caught:
        acme.revoke_key("agk_x_" + key[-43:])  # no id in it: refused, and not echoed
    assert key[-43:] not in str(caught.value) and "may hold a secret" in str(caught.value)


def test_a_key_made_while_its_tenant_is_deleted_is_refused_or_deleted(
    store: TenantStore,
) -> None:
    """Key creations racing the tenant's deletion: each key is made before the deletion
    (and deleted with the tenant) or refused as for an unknown tenant; nothing else fails
    (an IntegrityError used to escape as a 500)."""

    def make_key(name: str, outcomes: list[str]) -> None:
        try:
            store.create_key(name)
            outcomes.append("made")
        except Exception as exc:  # anything but "unknown tenant" fails the test
            unknown = isinstance(exc, TenantStoreError) and "unknown tenant" in str(exc)
            outcomes.append("unknown" if unknown else repr(exc))

    for round_ in range(40):
        name, outcomes = f"racy{round_}", []
        store.create_tenant(name, TenantLimits())
        makers = [threading.Thread(target=make_key, args=(name, outcomes)) for _ in range(3)]
        for maker in makers:
            maker.start()
        store.delete_tenant(name)
        for maker in makers:
            maker.join()
        assert len(outcomes) == 3 and set(outcomes) <= {"made", "unknown"}, outcomes
    assert store.list_keys() == []
