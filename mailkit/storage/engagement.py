"""The per-recipient engagement summary, kept up to date by triggers on ``events``.

``engagement`` has one row per (campaign, ledger row) with engagement events: how many human
and machine opens and clicks, bounces, soft bounces, unsubscribes and complaints it has, and
the times of its first human open (or click) and first human click. The metrics read it
instead of grouping millions of events on every query.

It is kept true *by construction*, whoever writes events (the tracking server, the bounce
processor, the dispatcher, ``record_events`` or a user's own ``INSERT``): triggers on
``events`` created by migration 0005 maintain it inside the writing transaction.

* INSERT adds the new events' contribution (counts + 1, first times = the earlier one).
* UPDATE and DELETE (rare: a link scanner flagged after the fact, a clean-up) recount the
  touched recipients from their events.

On SQLite these are row triggers; on PostgreSQL statement triggers over transition tables,
so that a ``COPY`` or a batch insert costs one set-based upsert (rows locked in key order,
so that concurrent writers cannot deadlock on it). Only events with a ``campaign_id``, a
``message_id`` and one of ``ENGAGEMENT_TYPES`` count, as in the metrics before the summary.

Bulk loads that bypass triggers (PostgreSQL's ``session_replication_role = replica``, or
``DROP TRIGGER`` around a load) must call ``rebuild_engagement`` afterwards (it also rebuilds
the timeline's per-minute counts, ``storage.event_minutes``, kept the same way).
"""

# The trigger DDL below is assembled from this module's constants only, never from input.
# ruff: noqa: S608

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy import (
    ColumnElement,
    Connection,
    Engine,
    Select,
    and_,
    case,
    delete,
    func,
    insert,
    select,
)

from ._triggers import drop_event_triggers
from .event_minutes import rebuild_event_minutes
from .schema import engagement, events

__all__ = [
    "ENGAGEMENT_TYPES",
    "build_engagement_trigger_ddl",
    "create_engagement_triggers",
    "drop_engagement_triggers",
    "rebuild_engagement",
    "select_engagement_rows",
]

#: Event types the summary counts (``sent`` and ``suppressed`` are not engagement).
ENGAGEMENT_TYPES = ("bounce", "soft_bounce", "open", "click", "unsubscribe", "complaint")

_COLUMNS = (
    "campaign_id",
    "message_id",
    "opens",
    "machine_opens",
    "clicks",
    "machine_clicks",
    "bounces",
    "soft_bounces",
    "unsubscribes",
    "complaints",
    "first_open_at",
    "first_click_at",
)
_COUNTS = _COLUMNS[2:10]
_TYPES_SQL = ", ".join(f"'{t}'" for t in ENGAGEMENT_TYPES)


def select_engagement_rows(where: ColumnElement[bool] | None = None) -> Select[Any]:
    """The summary rows recomputed from scratch from ``events`` (narrowed by ``where``).

    The definition the triggers maintain incrementally; ``rebuild_engagement``, the migration's
    backfill and the tests compare against it.
    """
    e = events.c
    human, machine = e.machine.is_(False), e.machine.is_(True)

    def count(condition: ColumnElement[bool]) -> ColumnElement[int]:
        return func.coalesce(func.sum(case((condition, 1), else_=0)), 0)

    query = (
        select(
            e.campaign_id,
            e.message_id,
            count(and_(e.type == "open", human)).label("opens"),
            count(and_(e.type == "open", machine)).label("machine_opens"),
            count(and_(e.type == "click", human)).label("clicks"),
            count(and_(e.type == "click", machine)).label("machine_clicks"),
            count(e.type == "bounce").label("bounces"),
            count(e.type == "soft_bounce").label("soft_bounces"),
            count(e.type == "unsubscribe").label("unsubscribes"),
            count(e.type == "complaint").label("complaints"),
            func.min(case((and_(e.type.in_(("open", "click")), human), e.occurred_at))).label(
                "first_open_at"
            ),
            func.min(case((and_(e.type == "click", human), e.occurred_at))).label("first_click_at"),
        )
        .where(
            e.campaign_id.is_not(None),
            e.message_id.is_not(None),
            e.type.in_(ENGAGEMENT_TYPES),
        )
        .group_by(e.campaign_id, e.message_id)
    )
    return query.where(where) if where is not None else query


def rebuild_engagement(
    db: Engine | Connection, campaign_ids: Sequence[int] | None = None, *, minutes: bool = True
) -> int:
    """Recompute the summary of ``campaign_ids`` (all campaigns when None) from ``events``,
    and (``minutes``) their events per minute (``storage.event_minutes``).

    Needed only after a load that bypassed the triggers; returns the number of summary rows.
    (Migration 0005 passes ``minutes=False``: ``event_minutes`` comes with 0007.)
    """
    if isinstance(db, Engine):
        with db.begin() as conn:
            return rebuild_engagement(conn, campaign_ids, minutes=minutes)
    if minutes:
        rebuild_event_minutes(db, campaign_ids)
    g = engagement.c
    wipe = delete(engagement)
    where = None
    if campaign_ids is not None:
        wipe = wipe.where(g.campaign_id.in_(list(campaign_ids)))
        where = events.c.campaign_id.in_(list(campaign_ids))
    db.execute(wipe)
    db.execute(insert(engagement).from_select(list(_COLUMNS), select_engagement_rows(where)))
    # Counted, not taken from rowcount: drivers report -1 for INSERT ... SELECT.
    rows = select(func.count()).select_from(engagement)
    if campaign_ids is not None:
        rows = rows.where(g.campaign_id.in_(list(campaign_ids)))
    return int(db.execute(rows).scalar_one())


# ---------------------------------------------------------------------------- trigger DDL
# Recounting one recipient from its events (``ix_events_message_type`` finds them).


def _sqlite_recount(row: str) -> str:
    key = f"campaign_id = {row}.campaign_id AND message_id = {row}.message_id"
    return f"""
    DELETE FROM engagement WHERE {key};
    INSERT INTO engagement ({", ".join(_COLUMNS)})
    SELECT campaign_id, message_id,
        sum(type = 'open' AND NOT machine), sum(type = 'open' AND machine),
        sum(type = 'click' AND NOT machine), sum(type = 'click' AND machine),
        sum(type = 'bounce'), sum(type = 'soft_bounce'),
        sum(type = 'unsubscribe'), sum(type = 'complaint'),
        min(CASE WHEN type IN ('open', 'click') AND NOT machine THEN occurred_at END),
        min(CASE WHEN type = 'click' AND NOT machine THEN occurred_at END)
    FROM events WHERE {key} AND type IN ({_TYPES_SQL})
    GROUP BY campaign_id, message_id;"""


def _sqlite_counts(row: str) -> str:
    return (
        f"{row}.type = 'open' AND NOT {row}.machine, {row}.type = 'open' AND {row}.machine, "
        f"{row}.type = 'click' AND NOT {row}.machine, {row}.type = 'click' AND {row}.machine, "
        f"{row}.type = 'bounce', {row}.type = 'soft_bounce', "
        f"{row}.type = 'unsubscribe', {row}.type = 'complaint'"
    )


def _relevant(row: str) -> str:
    return (
        f"({row}.campaign_id IS NOT NULL AND {row}.message_id IS NOT NULL "
        f"AND {row}.type IN ({_TYPES_SQL}))"
    )


def _sqlite_ddl() -> list[str]:
    added = ", ".join(f"{c} = {c} + excluded.{c}" for c in _COUNTS)
    # SQLite's two-argument min() is NULL when either is: keep whichever time exists.
    firsts = ", ".join(
        f"{c} = coalesce(min({c}, excluded.{c}), {c}, excluded.{c})"
        for c in ("first_open_at", "first_click_at")
    )
    return [
        f"""CREATE TRIGGER engagement_after_insert AFTER INSERT ON events
WHEN {_relevant("NEW")}
BEGIN
    INSERT INTO engagement ({", ".join(_COLUMNS)})
    VALUES (NEW.campaign_id, NEW.message_id, {_sqlite_counts("NEW")},
        CASE WHEN NEW.type IN ('open', 'click') AND NOT NEW.machine THEN NEW.occurred_at END,
        CASE WHEN NEW.type = 'click' AND NOT NEW.machine THEN NEW.occurred_at END)
    ON CONFLICT (campaign_id, message_id) DO UPDATE SET {added}, {firsts};
END""",
        f"""CREATE TRIGGER engagement_after_update
AFTER UPDATE OF campaign_id, message_id, type, machine, occurred_at ON events
WHEN {_relevant("OLD")} OR {_relevant("NEW")}
BEGIN{_sqlite_recount("OLD")}{_sqlite_recount("NEW")}
END""",
        f"""CREATE TRIGGER engagement_after_delete AFTER DELETE ON events
WHEN {_relevant("OLD")}
BEGIN{_sqlite_recount("OLD")}
END""",
    ]


_PG_AGGREGATES = """
        count(*) FILTER (WHERE type = 'open' AND NOT machine),
        count(*) FILTER (WHERE type = 'open' AND machine),
        count(*) FILTER (WHERE type = 'click' AND NOT machine),
        count(*) FILTER (WHERE type = 'click' AND machine),
        count(*) FILTER (WHERE type = 'bounce'),
        count(*) FILTER (WHERE type = 'soft_bounce'),
        count(*) FILTER (WHERE type = 'unsubscribe'),
        count(*) FILTER (WHERE type = 'complaint'),
        min(occurred_at) FILTER (WHERE type IN ('open', 'click') AND NOT machine),
        min(occurred_at) FILTER (WHERE type = 'click' AND NOT machine)"""


def _pg_recount(keys: str) -> str:
    """Delete and recount the summary rows of the (campaign_id, message_id) pairs in ``keys``."""
    return f"""
    DELETE FROM engagement g USING ({keys}) k
    WHERE g.campaign_id = k.campaign_id AND g.message_id = k.message_id;
    INSERT INTO engagement ({", ".join(_COLUMNS)})
    SELECT e.campaign_id, e.message_id,{_PG_AGGREGATES}
    FROM events e JOIN ({keys}) k
        ON e.campaign_id = k.campaign_id AND e.message_id = k.message_id
    WHERE e.type IN ({_TYPES_SQL})
    GROUP BY e.campaign_id, e.message_id
    ORDER BY e.campaign_id, e.message_id;"""


def _pg_keys(table: str) -> str:
    return (
        f"SELECT DISTINCT campaign_id, message_id FROM {table} "
        f"WHERE campaign_id IS NOT NULL AND message_id IS NOT NULL AND type IN ({_TYPES_SQL})"
    )


def _pg_ddl() -> list[str]:
    added = ", ".join(f"{c} = g.{c} + excluded.{c}" for c in _COUNTS)
    firsts = ", ".join(
        f"{c} = LEAST(g.{c}, excluded.{c})" for c in ("first_open_at", "first_click_at")
    )
    return [
        f"""CREATE FUNCTION engagement_add() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO engagement AS g ({", ".join(_COLUMNS)})
    SELECT campaign_id, message_id,{_PG_AGGREGATES}
    FROM new_rows
    WHERE campaign_id IS NOT NULL AND message_id IS NOT NULL AND type IN ({_TYPES_SQL})
    GROUP BY campaign_id, message_id
    ORDER BY campaign_id, message_id
    ON CONFLICT (campaign_id, message_id) DO UPDATE SET {added}, {firsts};
    RETURN NULL;
END $$""",
        f"""CREATE FUNCTION engagement_recount_updated() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN{_pg_recount(f"{_pg_keys('old_rows')} UNION {_pg_keys('new_rows')}")}
    RETURN NULL;
END $$""",
        f"""CREATE FUNCTION engagement_recount_deleted() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN{_pg_recount(_pg_keys("old_rows"))}
    RETURN NULL;
END $$""",
        """CREATE FUNCTION engagement_truncate() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    TRUNCATE engagement;
    RETURN NULL;
END $$""",
        "CREATE TRIGGER engagement_after_insert AFTER INSERT ON events "
        "REFERENCING NEW TABLE AS new_rows FOR EACH STATEMENT EXECUTE FUNCTION engagement_add()",
        "CREATE TRIGGER engagement_after_update AFTER UPDATE ON events "
        "REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows "
        "FOR EACH STATEMENT EXECUTE FUNCTION engagement_recount_updated()",
        "CREATE TRIGGER engagement_after_delete AFTER DELETE ON events "
        "REFERENCING OLD TABLE AS old_rows "
        "FOR EACH STATEMENT EXECUTE FUNCTION engagement_recount_deleted()",
        "CREATE TRIGGER engagement_after_truncate AFTER TRUNCATE ON events "
        "FOR EACH STATEMENT EXECUTE FUNCTION engagement_truncate()",
    ]


def build_engagement_trigger_ddl(dialect: str) -> list[str]:
    """The statements creating the summary's triggers (and functions) on ``dialect``."""
    if dialect == "sqlite":
        return _sqlite_ddl()
    if dialect == "postgresql":
        return _pg_ddl()
    from ..errors import StorageError

    raise StorageError(
        f"no engagement triggers for the {dialect!r} database: use SQLite or PostgreSQL"
    )


_TRIGGERS = ("engagement_after_insert", "engagement_after_update", "engagement_after_delete")
_PG_FUNCTIONS = (
    "engagement_add",
    "engagement_recount_updated",
    "engagement_recount_deleted",
    "engagement_truncate",
)


def create_engagement_triggers(conn: Connection) -> None:
    """Create the triggers that keep ``engagement`` true (migration 0005 calls this)."""
    for statement in build_engagement_trigger_ddl(conn.dialect.name):
        conn.exec_driver_sql(statement)


def drop_engagement_triggers(conn: Connection) -> None:
    """Drop the triggers (and, on PostgreSQL, their functions)."""
    drop_event_triggers(conn, _TRIGGERS, "engagement_after_truncate", _PG_FUNCTIONS)
