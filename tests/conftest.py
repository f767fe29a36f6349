"""Shared fixtures: real databases (a SQLite file, and a fresh PostgreSQL schema)."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator

import pytest
from sqlalchemy import Engine, create_engine, text

from mailkit.storage import open_db

PG_ADMIN_URL = os.environ.get(
    "MAILKIT_TEST_PG", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)


def _pg_available() -> str | None:
    """None when PostgreSQL answers, else the reason it does not."""
    try:
        engine = create_engine(PG_ADMIN_URL)
        with engine.connect() as conn:
            conn.execute(text("select 1"))
        engine.dispose()
    except Exception as exc:
        return f"PostgreSQL at {PG_ADMIN_URL} is not reachable: {exc.__class__.__name__}"
    return None


@pytest.fixture(scope="session")
def pg_admin() -> Iterator[Engine]:
    reason = _pg_available()
    if reason is not None:
        if os.environ.get("MAILKIT_REQUIRE_POSTGRES"):
            pytest.fail(reason + " (MAILKIT_REQUIRE_POSTGRES is set)")
        pytest.skip(reason)
    engine = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    yield engine
    engine.dispose()


@pytest.fixture
def pg_url(pg_admin: Engine) -> Iterator[str]:
    """URL of a fresh, empty PostgreSQL schema, dropped after the test."""
    schema = f"mk_{uuid.uuid4().hex[:12]}"
    with pg_admin.connect() as conn:
        conn.execute(text(f'CREATE SCHEMA "{schema}"'))
    yield f"{PG_ADMIN_URL}?options=-csearch_path%3D{schema}"
    with pg_admin.connect() as conn:
        conn.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))


@pytest.fixture
def sqlite_url(tmp_path: object) -> str:
    return f"sqlite:///{tmp_path}/mailkit.db"


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def db_url(request: pytest.FixtureRequest, tmp_path: object) -> str:
    """A database URL on each backend: a SQLite file, then a fresh PostgreSQL schema."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/mailkit.db"
    url: str = request.getfixturevalue("pg_url")
    return url


@pytest.fixture
def db(db_url: str) -> Iterator[Engine]:
    """A migrated workspace database on each backend."""
    engine = open_db(db_url)
    yield engine
    engine.dispose()


@pytest.fixture
def sqlite_db(sqlite_url: str) -> Iterator[Engine]:
    """A migrated workspace database in a SQLite file only (for tests of file-level behaviour)."""
    engine = open_db(sqlite_url)
    yield engine
    engine.dispose()


#: Workspace settings a developer's shell may hold; tests that read settings start without them.
WORKSPACE_SETTINGS = (
    "MAILKIT_DB",
    "MAILKIT_SMTP_URL",
    "MAILKIT_TRACKING_URL",
    "MAILKIT_DKIM_DOMAIN",
    "MAILKIT_DKIM_SELECTOR",
    "MAILKIT_DKIM_KEY",
)


@pytest.fixture
def no_settings_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """The test's settings are its own: none leak in from the environment."""
    for name in WORKSPACE_SETTINGS:
        monkeypatch.delenv(name, raising=False)


@pytest.fixture(params=["uvloop", "asyncio"])
def each_event_loop(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Runs the test once on each event loop mailkit supports (``MAILKIT_EVENT_LOOP``)."""
    monkeypatch.setenv("MAILKIT_EVENT_LOOP", request.param)
    name: str = request.param
    return name
