"""Storage: SQLAlchemy Core schema, engine creation (SQLite WAL, PostgreSQL) and migrations."""

from .engine import create_db_engine, migrate_db, open_db, schema_revision
from .schema import metadata, utcnow

__all__ = ["create_db_engine", "metadata", "migrate_db", "open_db", "schema_revision", "utcnow"]
