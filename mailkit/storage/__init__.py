"""Storage: SQLAlchemy Core schema, engine creation (SQLite WAL, PostgreSQL) and migrations."""

from .engagement import rebuild_engagement
from .engine import (
    WriteLockBusy,
    begin_without_waiting,
    connect_for_reading,
    create_db_engine,
    migrate_db,
    open_db,
    schema_revision,
)
from .schema import metadata, utcnow

__all__ = [
    "WriteLockBusy",
    "begin_without_waiting",
    "connect_for_reading",
    "create_db_engine",
    "metadata",
    "migrate_db",
    "open_db",
    "rebuild_engagement",
    "schema_revision",
    "utcnow",
]
