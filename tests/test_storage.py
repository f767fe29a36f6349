from __future__ import annotations

import sqlite3
import time

import pytest
from sqlalchemy import Engine, inspect, text

from mailkit.storage import WriteLockBusy, begin_without_waiting, open_db, schema_revision
from mailkit.storage.schema import metadata


def test_migrations_create_every_table_of_the_schema(db: Engine) -> None:
    assert schema_revision(db) is not None
    tables = set(inspect(db).get_table_names())
    assert set(metadata.tables) <= tables


def test_migrating_twice_changes_nothing(db_url: str) -> None:
    first = open_db(db_url)
    rev = schema_revision(first)
    first.dispose()
    second = open_db(db_url)
    assert schema_revision(second) == rev
    second.dispose()


def test_sqlite_is_in_wal_mode_with_foreign_keys(sqlite_db: Engine) -> None:
    with sqlite_db.connect() as conn:
        assert conn.execute(text("PRAGMA journal_mode")).scalar() == "wal"
        assert conn.execute(text("PRAGMA foreign_keys")).scalar() == 1


def test_the_migrated_schema_matches_the_declared_one(db: Engine) -> None:
    """Alembic's autogenerate comparison finds nothing to change between migrations and schema."""
    from alembic.autogenerate import compare_metadata
    from alembic.runtime.migration import MigrationContext

    with db.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), metadata)
    # Server defaults are migration-only (the schema declares Python-side defaults).
    assert diff == []


def test_begin_without_waiting_refuses_at_once_while_another_connection_writes(
    sqlite_db: Engine,
) -> None:
    other = sqlite3.connect(str(sqlite_db.url.database), isolation_level=None)
    other.execute("BEGIN IMMEDIATE")
    try:
        started = time.monotonic()
        with pytest.raises(WriteLockBusy), begin_without_waiting(sqlite_db) as conn:
            conn.execute(text("DELETE FROM contacts"))
        # Refused by SQLite itself, not after its 30 s busy timeout ran out.
        assert time.monotonic() - started < 10
    finally:
        other.execute("ROLLBACK")
        other.close()
    with begin_without_waiting(sqlite_db) as conn:
        conn.execute(text("CREATE TABLE scratch (x INTEGER)"))
    # The pooled connection waits for the lock again, as every other write does.
    with sqlite_db.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() == 30_000
    assert "scratch" in inspect(sqlite_db).get_table_names()


def test_begin_without_waiting_is_a_plain_transaction_elsewhere(db: Engine) -> None:
    with begin_without_waiting(db) as conn:
        conn.execute(text("CREATE TABLE scratch_plain (x INTEGER)"))
    assert "scratch_plain" in inspect(db).get_table_names()
