"""Every store test runs twice: on a SQLite file and on PostgreSQL.

The PostgreSQL runs need a server: ``AUTOGLM_TEST_POSTGRES_URL`` names it (``.ci/run``
starts one with ``.ci/postgres.sh``), and each test gets a fresh database on it. Without
the variable they are skipped with the reason.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator

import pytest
from sqlalchemy import Engine, create_engine
from sqlalchemy.engine import make_url
from sqlalchemy.pool import NullPool

from auto_glm.tenants import TenantStore

POSTGRES_URL = os.environ.get("AUTOGLM_TEST_POSTGRES_URL")
NO_POSTGRES = (
    "AUTOGLM_TEST_POSTGRES_URL is unset: start a throwaway server with "
    '`eval "$(.ci/postgres.sh start)"` to run the PostgreSQL variants'
)


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    """The URL of an empty database of each kind."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path_factory.mktemp('sqlite') / 'tenants.db'}"
        return
    if not POSTGRES_URL:
        pytest.skip(NO_POSTGRES)
    name = f"autoglm_test_{uuid.uuid4().hex[:16]}"
    admin = create_engine(POSTGRES_URL, isolation_level="AUTOCOMMIT", poolclass=NullPool)
    with admin.connect() as connection:
        connection.exec_driver_sql(f'CREATE DATABASE "{name}"')
    yield make_url(POSTGRES_URL).set(database=name).render_as_string(hide_password=False)
    with admin.connect() as connection:
        connection.exec_driver_sql(f'DROP DATABASE "{name}" WITH (FORCE)')
    admin.dispose()


@pytest.fixture
def store(database_url: str) -> Iterator[TenantStore]:
    """A store on a fresh database of each kind."""
    with TenantStore(database_url) as opened:
        yield opened


@pytest.fixture
def raw(database_url: str) -> Iterator[Engine]:
    """A plain engine on the store's database, to read and change its tables directly."""
    url = make_url(database_url)
    if url.get_backend_name() == "postgresql":
        url = url.set(drivername="postgresql+psycopg")
    engine = create_engine(url, poolclass=NullPool)
    yield engine
    engine.dispose()
