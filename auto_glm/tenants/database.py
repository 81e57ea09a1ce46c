"""Opening the store's database: the URL, the SQLAlchemy engine, and migrations on open."""

from __future__ import annotations

import os
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.util import CommandError
from sqlalchemy import Connection, Engine, create_engine, event, exc, text
from sqlalchemy.engine import URL, make_url

from auto_glm.tenants.errors import TenantStoreError

__all__ = [
    "Database",
    "default_database_url",
    "display_url",
    "migrate",
    "open_engine",
    "unreachable",
]

_MIGRATIONS = Path(__file__).with_name("migrations")
_MIGRATION_LOCK = 0x6175746F676C6D  # "autoglm": serialises concurrent migrations on PostgreSQL
_SQLITE_BUSY_TIMEOUT_S = 30  # how long a connection waits for another's write lock
_FORMS = "sqlite:///PATH or postgresql+psycopg://USER:PASSWORD@HOST:PORT/DATABASE"


def default_database_url() -> str:
    """``sqlite:///$AUTOGLM_HOME/autoglm.db`` (``AUTOGLM_HOME``: ``~/.cache/autoglm``),
    creating the directory."""
    home = Path(os.environ.get("AUTOGLM_HOME") or Path.home() / ".cache" / "autoglm")
    try:
        home.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise TenantStoreError(
            f"cannot create the database directory {home}: {error.strerror}; set "
            "$AUTOGLM_HOME to a writable directory, or pass a database URL"
        ) from error
    return f"sqlite:///{home / 'autoglm.db'}"


def display_url(url: URL) -> str:
    """``url`` as it may be shown: with its password, if any, replaced by ``***``."""
    return url.render_as_string(hide_password=True)


def unreachable(url: URL, error: exc.DBAPIError) -> TenantStoreError:
    """The error for a database that could not be used, naming it without its password."""
    reason = str(error.orig).strip().splitlines()[0] if error.orig else str(error)
    if url.password:
        reason = reason.replace(str(url.password), "***")
    if isinstance(error.orig, sqlite3.Error) and error.orig.sqlite_errorcode == sqlite3.SQLITE_BUSY:
        fix = (
            f"another connection held its write lock for over {_SQLITE_BUSY_TIMEOUT_S} s; "
            "retry when it is done, or stop the process that holds it"
        )
    elif url.get_backend_name() == "sqlite":
        fix = "check that its directory exists and is writable"
    else:
        fix = "check that the server is running and the URL's host, port, user and password"
    return TenantStoreError(f"cannot use the database {display_url(url)}: {reason}; {fix}")


def _parse(url: str) -> URL:
    try:
        parsed = make_url(url)
    except exc.ArgumentError:
        # The text may hold a password, so it is not repeated.
        raise TenantStoreError(f"malformed database URL: use {_FORMS}") from None
    backend = parsed.get_backend_name()
    if backend == "postgresql" and parsed.get_driver_name() in ("psycopg2", "psycopg"):
        return parsed.set(drivername="postgresql+psycopg")
    if backend == "sqlite" and parsed.get_driver_name() == "pysqlite":
        return parsed
    raise TenantStoreError(f"unsupported database URL {display_url(parsed)}: use {_FORMS}")


def _enable_sqlite_options(dbapi_connection: object, _record: object) -> None:
    cursor = dbapi_connection.cursor()  # type: ignore[attr-defined]
    cursor.execute("PRAGMA foreign_keys=ON")
    _switch_to_wal(cursor)
    cursor.close()


def _switch_to_wal(cursor: sqlite3.Cursor) -> None:
    """``PRAGMA journal_mode=WAL``, so that readers do not wait for the usage writer.

    While another connection writes to a file not yet in WAL mode (a fresh database that
    a second store is migrating), SQLite refuses the switch at once, without the busy
    timeout that other statements wait for; so it is retried for as long as that timeout.
    """
    deadline = time.monotonic() + _SQLITE_BUSY_TIMEOUT_S
    while True:
        try:
            cursor.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as error:
            if error.sqlite_errorcode != sqlite3.SQLITE_BUSY or time.monotonic() > deadline:
                raise
        time.sleep(0.01)


def open_engine(url: str) -> tuple[Engine, URL]:
    """Create the engine for ``url`` (``postgresql://`` means psycopg 3) and its parsed URL."""
    parsed = _parse(url)
    if parsed.get_backend_name() == "sqlite":
        if parsed.database in (None, "", ":memory:"):
            raise TenantStoreError(
                "in-memory SQLite cannot hold the tenant store (each connection would get its "
                "own empty database): use a file, sqlite:///PATH"
            )
        engine = create_engine(
            parsed, connect_args={"timeout": _SQLITE_BUSY_TIMEOUT_S, "check_same_thread": False}
        )
        event.listen(engine, "connect", _enable_sqlite_options)
        return engine, parsed
    timeout = {} if "connect_timeout" in parsed.query else {"connect_timeout": 10}
    try:
        engine = create_engine(parsed, pool_pre_ping=True, connect_args=timeout)
    except ModuleNotFoundError:
        raise TenantStoreError(
            "PostgreSQL needs the psycopg package: pip install 'open-autoglm[postgres]'"
        ) from None
    return engine, parsed


def migrate(engine: Engine) -> None:
    """Bring the schema up to the newest migration; a no-op when it is already there.

    The whole upgrade is one transaction that other processes wait for: an advisory lock
    on PostgreSQL, ``BEGIN IMMEDIATE`` on SQLite (whose DDL is transactional too).
    """
    config = Config()
    config.set_main_option("script_location", str(_MIGRATIONS))
    with engine.connect() as connection:
        if connection.dialect.name == "sqlite":
            connection.exec_driver_sql("BEGIN IMMEDIATE")
        else:
            connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _MIGRATION_LOCK})
        config.attributes["connection"] = connection
        try:
            command.upgrade(config, "head")
        except CommandError as error:  # a revision this version does not have: a newer one
            raise TenantStoreError(
                f"the database has a newer schema than this version of autoglm knows ({error}): "
                "upgrade autoglm (pip install -U open-autoglm), or use another database"
            ) from None
        connection.commit()


class Database:
    """The database of the stores (tenants, the model registry; they subclass it): opened
    and migrated to the newest schema, one transaction per call, a context manager.
    Failures are raised as ``error_type`` (the calling store's error) with the message of
    :func:`unreachable`."""

    def __init__(self, url: str | None, error_type: type[Exception] = TenantStoreError) -> None:
        self.error_type = error_type
        try:
            self.engine, self.url = open_engine(url or default_database_url())
        except TenantStoreError as error:
            raise self._as_error(error) from None
        try:
            migrate(self.engine)
        except BaseException as error:
            self.engine.dispose()
            if isinstance(error, exc.DBAPIError):
                raise self._as_error(unreachable(self.url, error)) from error
            if isinstance(error, TenantStoreError):
                raise self._as_error(error) from None
            raise

    def __enter__(self):
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _as_error(self, error: TenantStoreError) -> Exception:
        return error if self.error_type is TenantStoreError else self.error_type(str(error))

    def close(self) -> None:
        """Close the database connections."""
        self.engine.dispose()

    @contextmanager
    def transaction(self) -> Iterator[Connection]:
        try:
            with self.engine.begin() as connection:
                yield connection
        except exc.OperationalError as error:
            raise self._as_error(unreachable(self.url, error)) from error
