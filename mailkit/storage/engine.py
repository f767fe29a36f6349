"""Opening a workspace database: engine creation and migration to head."""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, Engine, create_engine, event, inspect
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, OperationalError

from ..config import load_settings
from ..errors import ConfigError, StorageError

__all__ = [
    "WriteLockBusy",
    "begin_without_waiting",
    "connect_for_reading",
    "create_db_engine",
    "migrate_db",
    "open_db",
    "schema_revision",
]

_MIGRATIONS = Path(__file__).parent / "migrations"
#: How long a SQLite write waits for another connection's write lock.
_BUSY_TIMEOUT_MS = 30_000


def create_db_engine(url: str) -> Engine:
    """An engine for ``url``; SQLite files get WAL, foreign keys and a busy timeout."""
    try:
        parsed = make_url(url)
    except ArgumentError as exc:
        raise ConfigError(
            f"not a database URL: {url!r} (expected e.g. sqlite:///mailkit.db or "
            "postgresql+psycopg://user@host/db)"
        ) from exc
    if parsed.get_backend_name() == "sqlite":
        if parsed.database and parsed.database != ":memory:":
            Path(parsed.database).expanduser().parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(parsed, connect_args={"timeout": _BUSY_TIMEOUT_MS / 1000})
        event.listen(engine, "connect", _sqlite_pragmas)
        # pysqlite's own transaction handling defers BEGIN; take it over so that writes
        # take the lock at BEGIN (IMMEDIATE) and two writers cannot deadlock on upgrade.
        event.listen(engine, "begin", _sqlite_begin)
        return engine
    return create_engine(parsed, pool_pre_ping=True)


#: Execution option of connections that only read: on SQLite their transaction is a plain
#: (deferred) BEGIN, a WAL snapshot that neither takes nor waits for the write lock, so a long
#: analytics read does not hold up the tracking server's writes (see ``connect_for_reading``).
READ_ONLY_OPTION = "mailkit_read_only"


#: Execution option of a write connection that must not wait for SQLite's write lock.
NO_WAIT_OPTION = "mailkit_no_wait"


class WriteLockBusy(StorageError):
    """Another connection holds SQLite's write lock (``begin_without_waiting``)."""


def _sqlite_begin(conn: Connection) -> None:
    options = conn.get_execution_options()
    if options.get(NO_WAIT_OPTION, False):
        _begin_immediate_without_waiting(conn.connection.dbapi_connection)
        return
    read_only = options.get(READ_ONLY_OPTION, False)
    conn.exec_driver_sql("BEGIN" if read_only else "BEGIN IMMEDIATE")


def _begin_immediate_without_waiting(dbapi_conn: Any) -> None:
    cursor = dbapi_conn.cursor()
    try:
        cursor.execute("PRAGMA busy_timeout=0")
        try:
            cursor.execute("BEGIN IMMEDIATE")
        except sqlite3.OperationalError as exc:
            if exc.sqlite_errorcode == sqlite3.SQLITE_BUSY:
                raise WriteLockBusy("another connection holds the write lock") from exc
            raise
        finally:
            cursor.execute(f"PRAGMA busy_timeout={_BUSY_TIMEOUT_MS}")
    finally:
        cursor.close()


@contextlib.contextmanager
def begin_without_waiting(engine: Engine) -> Iterator[Connection]:
    """A write transaction, like ``engine.begin()``, that on SQLite does not wait for the
    write lock: while another connection holds it, this raises ``WriteLockBusy`` at once and
    nothing is done. Other databases have no database-wide write lock: a plain transaction.
    """
    if engine.dialect.name != "sqlite":
        with engine.begin() as conn:
            yield conn
        return
    with engine.connect() as conn:
        conn = conn.execution_options(**{NO_WAIT_OPTION: True})
        with conn.begin():
            yield conn


def connect_for_reading(engine: Engine) -> Connection:
    """A connection for reads only (use as a context manager, like ``engine.connect()``).

    On SQLite its transaction is a snapshot that does not take the write lock, so several
    readers, and writers, run side by side; writing through it is an error on SQLite.
    """
    return engine.connect().execution_options(**{READ_ONLY_OPTION: True})


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    dbapi_conn.isolation_level = None  # autocommit at the driver; SQLAlchemy emits BEGIN
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.execute(f"PRAGMA busy_timeout={_BUSY_TIMEOUT_MS}")
    cur.close()


def migrate_db(engine: Engine, revision: str = "head") -> None:
    """Bring the schema to ``revision`` through the versioned migrations."""
    from alembic import command
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(_MIGRATIONS))
    try:
        with engine.begin() as conn:
            cfg.attributes["connection"] = conn
            command.upgrade(cfg, revision)
    except OperationalError as exc:
        raise StorageError(f"cannot migrate database {engine.url!r}: {exc.orig}") from exc


def schema_revision(engine: Engine) -> str | None:
    """The migration revision the database is at, or None for an empty database."""
    from alembic.runtime.migration import MigrationContext

    with engine.connect() as conn:
        if not inspect(conn).has_table("alembic_version"):
            return None
        return MigrationContext.configure(conn).get_current_revision()


def open_db(url: str | None = None, *, migrate: bool = True) -> Engine:
    """Open the workspace database (``url``, else ``MAILKIT_DB``, else ``sqlite:///mailkit.db``).

    With ``migrate`` (the default) the schema is created or upgraded to the newest revision.
    """
    engine = create_db_engine(url or load_settings().db_url)
    if migrate:
        migrate_db(engine)
    return engine
