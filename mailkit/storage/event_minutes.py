"""Events per minute of each campaign, kept up to date by triggers on ``events``.

``event_minutes`` has one row per (campaign, type, machine, minute) with events of a
timeline type (open, click, unsubscribe): how many there are. The timeline sums the whole
minutes of each period from it (a few thousand rows) instead of counting millions of events;
only a period edge that falls inside a minute is counted from ``events`` (see
``analytics.timeline``). Minutes are UTC, stored like ``occurred_at`` (a timestamp on
PostgreSQL, naive UTC text on SQLite), so the same bound parameters compare with both.

As for the engagement summary (``storage.engagement``), triggers created by migration 0007
keep it true whoever writes events: on SQLite row triggers, on PostgreSQL statement triggers
over transition tables (one grouped upsert per statement, rows locked in key order). INSERT
adds one per event, DELETE takes one off (dropping rows that reach zero), UPDATE both.
Loads that bypass the triggers must call ``rebuild_event_minutes`` (``rebuild_engagement``
does) afterwards.
"""

# The trigger DDL below is assembled from this module's constants only, never from input.
# ruff: noqa: S608

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy import Connection, Engine, delete, func, insert, literal_column, select
from sqlalchemy import Select as SelectType

from ._triggers import drop_event_triggers
from .schema import UTCDateTime, event_minutes, events

__all__ = [
    "TIMELINE_TYPES",
    "create_event_minute_triggers",
    "drop_event_minute_triggers",
    "rebuild_event_minutes",
    "select_event_minute_rows",
]

#: Event types counted per minute: those the timeline shows.
TIMELINE_TYPES = ("open", "click", "unsubscribe")

_TYPES_SQL = ", ".join(f"'{t}'" for t in TIMELINE_TYPES)
_KEY = ("campaign_id", "type", "machine", "minute")
# SQLite stores timestamps as 'YYYY-MM-DD HH:MM:SS.ffffff' (SQLAlchemy's format, always with
# microseconds); PostgreSQL truncates in UTC, whatever the session's time zone.
_SQLITE_MINUTE = "substr({t}.occurred_at, 1, 16) || ':00.000000'"
_PG_MINUTE = "date_trunc('minute', {t}.occurred_at AT TIME ZONE 'UTC') AT TIME ZONE 'UTC'"


def _minute_sql(dialect: str, table: str) -> str:
    return (_SQLITE_MINUTE if dialect == "sqlite" else _PG_MINUTE).format(t=table)


def select_event_minute_rows(dialect: str, campaign_ids: Sequence[int] | None = None) -> Any:
    """The rows of ``event_minutes`` recounted from ``events`` (of ``campaign_ids``)."""
    e = events.c
    minute = literal_column(_minute_sql(dialect, "events"), type_=UTCDateTime()).label("minute")
    query: SelectType[Any] = (
        select(e.campaign_id, e.type, e.machine, minute, func.count().label("events"))
        .where(e.campaign_id.is_not(None), e.type.in_(TIMELINE_TYPES))
        .group_by(e.campaign_id, e.type, e.machine, minute)
    )
    if campaign_ids is not None:
        query = query.where(e.campaign_id.in_(list(campaign_ids)))
    return query


def rebuild_event_minutes(
    db: Engine | Connection, campaign_ids: Sequence[int] | None = None
) -> None:
    """Recount ``event_minutes`` of ``campaign_ids`` (all when None) from ``events``."""
    if isinstance(db, Engine):
        with db.begin() as conn:
            rebuild_event_minutes(conn, campaign_ids)
            return
    wipe = delete(event_minutes)
    if campaign_ids is not None:
        wipe = wipe.where(event_minutes.c.campaign_id.in_(list(campaign_ids)))
    db.execute(wipe)
    rows = select_event_minute_rows(db.dialect.name, campaign_ids)
    db.execute(insert(event_minutes).from_select([*_KEY, "events"], rows))


# ---------------------------------------------------------------------------- trigger DDL


def _relevant(row: str) -> str:
    return f"({row}.campaign_id IS NOT NULL AND {row}.type IN ({_TYPES_SQL}))"


def _sqlite_key(row: str) -> str:
    return (
        f"campaign_id = {row}.campaign_id AND type = {row}.type AND machine = {row}.machine "
        f"AND minute = {_SQLITE_MINUTE.format(t=row)}"
    )


def _sqlite_ddl() -> list[str]:
    def add(row: str) -> str:
        return f"""
    INSERT INTO event_minutes (campaign_id, type, machine, minute, events)
    SELECT {row}.campaign_id, {row}.type, {row}.machine, {_SQLITE_MINUTE.format(t=row)}, 1
    WHERE {_relevant(row)}
    ON CONFLICT (campaign_id, type, machine, minute) DO UPDATE SET events = events + 1;"""

    def remove(row: str) -> str:
        return f"""
    UPDATE event_minutes SET events = events - 1 WHERE {_relevant(row)} AND {_sqlite_key(row)};
    DELETE FROM event_minutes WHERE {_sqlite_key(row)} AND events <= 0;"""

    return [
        f"""CREATE TRIGGER event_minutes_after_insert AFTER INSERT ON events
WHEN {_relevant("NEW")}
BEGIN{add("NEW")}
END""",
        f"""CREATE TRIGGER event_minutes_after_update
AFTER UPDATE OF campaign_id, type, machine, occurred_at ON events
WHEN {_relevant("OLD")} OR {_relevant("NEW")}
BEGIN{remove("OLD")}{add("NEW")}
END""",
        f"""CREATE TRIGGER event_minutes_after_delete AFTER DELETE ON events
WHEN {_relevant("OLD")}
BEGIN{remove("OLD")}
END""",
    ]


def _pg_grouped(table: str) -> str:
    return (
        f"SELECT campaign_id, type, machine, {_PG_MINUTE.format(t=table)} AS minute, "
        f"count(*) AS n FROM {table} WHERE {_relevant(table)} GROUP BY 1, 2, 3, 4"
    )


def _pg_add(table: str) -> str:
    return f"""
    INSERT INTO event_minutes AS m (campaign_id, type, machine, minute, events)
    SELECT campaign_id, type, machine, minute, n FROM ({_pg_grouped(table)}) g
    ORDER BY campaign_id, type, machine, minute
    ON CONFLICT (campaign_id, type, machine, minute)
    DO UPDATE SET events = m.events + excluded.events;"""


def _pg_remove(table: str) -> str:
    match = " AND ".join(f"m.{c} = g.{c}" for c in _KEY)
    return f"""
    UPDATE event_minutes m SET events = m.events - g.n FROM ({_pg_grouped(table)}) g
    WHERE {match};
    DELETE FROM event_minutes m USING ({_pg_grouped(table)}) g WHERE {match} AND m.events <= 0;"""


def _pg_ddl() -> list[str]:
    return [
        f"""CREATE FUNCTION event_minutes_add() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN{_pg_add("new_rows")}
    RETURN NULL;
END $$""",
        f"""CREATE FUNCTION event_minutes_move() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN{_pg_remove("old_rows")}{_pg_add("new_rows")}
    RETURN NULL;
END $$""",
        f"""CREATE FUNCTION event_minutes_remove() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN{_pg_remove("old_rows")}
    RETURN NULL;
END $$""",
        """CREATE FUNCTION event_minutes_truncate() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    TRUNCATE event_minutes;
    RETURN NULL;
END $$""",
        "CREATE TRIGGER event_minutes_after_insert AFTER INSERT ON events "
        "REFERENCING NEW TABLE AS new_rows FOR EACH STATEMENT EXECUTE FUNCTION event_minutes_add()",
        "CREATE TRIGGER event_minutes_after_update AFTER UPDATE ON events "
        "REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows "
        "FOR EACH STATEMENT EXECUTE FUNCTION event_minutes_move()",
        "CREATE TRIGGER event_minutes_after_delete AFTER DELETE ON events "
        "REFERENCING OLD TABLE AS old_rows "
        "FOR EACH STATEMENT EXECUTE FUNCTION event_minutes_remove()",
        "CREATE TRIGGER event_minutes_after_truncate AFTER TRUNCATE ON events "
        "FOR EACH STATEMENT EXECUTE FUNCTION event_minutes_truncate()",
    ]


_TRIGGERS = (
    "event_minutes_after_insert",
    "event_minutes_after_update",
    "event_minutes_after_delete",
)
_PG_FUNCTIONS = (
    "event_minutes_add",
    "event_minutes_move",
    "event_minutes_remove",
    "event_minutes_truncate",
)


def create_event_minute_triggers(conn: Connection) -> None:
    """Create the triggers that keep ``event_minutes`` true (migration 0007 calls this)."""
    if conn.dialect.name not in ("sqlite", "postgresql"):
        from ..errors import StorageError

        raise StorageError(
            f"no event_minutes triggers for the {conn.dialect.name!r} database: "
            "use SQLite or PostgreSQL"
        )
    for statement in _sqlite_ddl() if conn.dialect.name == "sqlite" else _pg_ddl():
        conn.exec_driver_sql(statement)


def drop_event_minute_triggers(conn: Connection) -> None:
    """Drop the triggers (and, on PostgreSQL, their functions)."""
    drop_event_triggers(conn, _TRIGGERS, "event_minutes_after_truncate", _PG_FUNCTIONS)
