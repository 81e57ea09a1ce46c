"""Opening a store: the schema from migrations, reopening, and the errors for bad URLs."""

from __future__ import annotations

import logging
import socket
import sqlite3
import threading
import time
from datetime import date
from pathlib import Path

import pytest
from sqlalchemy import Engine, create_engine, exc, inspect, text
from sqlalchemy.engine import make_url

from auto_glm.tenants import (
    TenantLimits,
    TenantStore,
    TenantStoreError,
    UsageDelta,
    default_database_url,
)
from auto_glm.tenants.database import unreachable

TABLES = {"tenants", "api_keys", "daily_usage", "autoglm_alembic_version"}


def _version(raw: Engine) -> list[str]:
    with raw.connect() as connection:
        return list(
            connection.execute(text("SELECT version_num FROM autoglm_alembic_version")).scalars()
        )


def test_a_fresh_database_gets_the_whole_schema(database_url: str, raw: Engine) -> None:
    assert TABLES.isdisjoint(inspect(raw).get_table_names())
    TenantStore(database_url).close()
    schema = inspect(raw)
    assert set(schema.get_table_names()) >= TABLES
    assert {c["name"] for c in schema.get_columns("api_keys")} == {
        "key_id",
        "tenant_id",
        "digest",
        "created_at",
        "expires_at",
        "revoked_at",
    }
    assert schema.get_pk_constraint("daily_usage")["constrained_columns"] == [
        "tenant",
        "model",
        "day",
    ]
    assert _version(raw) == ["0002"]


def test_reopening_runs_no_migration_and_keeps_the_data(
    database_url: str, raw: Engine, caplog: pytest.LogCaptureFixture
) -> None:
    with TenantStore(database_url) as store:
        store.create_tenant("acme", TenantLimits(rpm=10, models=("m",)))
        _, key = store.create_key("acme")
        store.add_usage([UsageDelta("acme", "m", date(2026, 1, 2), requests=1, prompt_tokens=5)])
    caplog.set_level(logging.INFO, logger="alembic")
    with TenantStore(database_url) as store:
        tenant, _ = store.authenticate(key)
        assert tenant.limits == TenantLimits(rpm=10, models=("m",))
        assert store.tokens_used("acme", date(2026, 1, 2)) == 5
    assert not [r for r in caplog.records if "Running upgrade" in r.getMessage()]
    assert _version(raw) == ["0002"]


def test_a_newer_schema_is_refused_with_the_fix(database_url: str, raw: Engine) -> None:
    TenantStore(database_url).close()
    with raw.begin() as connection:
        connection.execute(text("UPDATE autoglm_alembic_version SET version_num = '9999'"))
    with pytest.raises(TenantStoreError, match="newer schema .* upgrade autoglm"):
        TenantStore(database_url)


def test_two_stores_opening_a_fresh_database_at_once_both_work(database_url: str) -> None:
    errors: list[BaseException] = []
    stores: list[TenantStore] = []

    def open_store() -> None:
        try:
            stores.append(TenantStore(database_url))
        except BaseException as error:  # reported below
            errors.append(error)

    threads = [threading.Thread(target=open_store) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    stores[0].create_tenant("acme")
    assert [t.name for t in stores[1].list_tenants()] == ["acme"]
    for store in stores:
        store.close()


def test_a_store_opened_while_a_fresh_sqlite_file_is_being_written_waits_for_it(
    tmp_path: Path,
) -> None:
    # SQLite refuses a switch to WAL mode at once, without its busy timeout, while another
    # connection writes to a file that is not yet in WAL mode: two stores migrating a fresh
    # file at once met this in about one try in five.
    path = tmp_path / "tenants.db"
    writer = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    writer.execute("BEGIN IMMEDIATE")
    writer.execute("CREATE TABLE other_app (x INTEGER)")
    release = threading.Timer(0.5, writer.execute, ["COMMIT"])
    release.start()
    started = time.monotonic()
    with TenantStore(f"sqlite:///{path}") as store:
        waited = time.monotonic() - started
        store.create_tenant("acme")
        assert [t.name for t in store.list_tenants()] == ["acme"]
    release.join()
    writer.close()
    assert waited >= 0.4


def test_a_write_lock_held_past_the_timeout_is_named_as_such(tmp_path: Path) -> None:
    path = tmp_path / "tenants.db"
    writer = sqlite3.connect(path, isolation_level=None)
    writer.execute("BEGIN IMMEDIATE")
    impatient = create_engine(f"sqlite:///{path}", connect_args={"timeout": 0})
    with pytest.raises(exc.OperationalError) as raised, impatient.connect() as connection:
        connection.exec_driver_sql("BEGIN IMMEDIATE")
    impatient.dispose()
    writer.close()
    error = unreachable(make_url(f"sqlite:///{path}"), raised.value)
    assert "database is locked; another connection held its write lock for over 30 s" in str(error)


def test_default_url_is_a_sqlite_file_under_autoglm_home(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AUTOGLM_HOME", str(tmp_path / "home"))
    assert default_database_url() == f"sqlite:///{tmp_path / 'home' / 'autoglm.db'}"
    assert (tmp_path / "home").is_dir()
    with TenantStore() as store:
        store.create_tenant("acme")
    assert (tmp_path / "home" / "autoglm.db").is_file()


def test_default_home_is_the_user_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("AUTOGLM_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert default_database_url() == f"sqlite:///{tmp_path / '.cache' / 'autoglm' / 'autoglm.db'}"


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("not a url", "malformed database URL: use sqlite:///PATH or postgresql+psycopg://"),
        ("mysql://user@host/db", "unsupported database URL mysql://user@host/db: use sqlite:///"),
        ("postgresql+asyncpg://u@h/db", "unsupported database URL"),
        ("sqlite://", "in-memory SQLite cannot hold the tenant store"),
    ],
)
def test_bad_urls_are_refused_with_the_forms_to_use(url: str, expected: str) -> None:
    with pytest.raises(TenantStoreError, match="^" + expected.replace("+", r"\+")):
        TenantStore(url)


def test_an_unreachable_server_is_named_without_its_password() -> None:
    with socket.socket() as probe:  # a port that nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with pytest.raises(TenantStoreError) as caught:
        TenantStore(f"postgresql://alice:hunter2@127.0.0.1:{port}/autoglm")
    message = str(caught.value)
    assert (
        f"cannot use the database postgresql+psycopg://alice:***@127.0.0.1:{port}/autoglm"
        in message
    )
    assert "hunter2" not in message
    assert "check that the server is running" in message


def test_a_sqlite_file_in_a_missing_directory_says_so(tmp_path: Path) -> None:
    with pytest.raises(TenantStoreError, match="check that its directory exists and is writable"):
        TenantStore(f"sqlite:///{tmp_path / 'missing' / 'tenants.db'}")
