"""What the trigger-kept tables on ``events`` (engagement, event_minutes) share."""

from __future__ import annotations

from collections.abc import Sequence

from sqlalchemy import Connection

__all__ = ["drop_event_triggers"]


def drop_event_triggers(
    conn: Connection, triggers: Sequence[str], truncate_trigger: str, functions: Sequence[str]
) -> None:
    """Drop row triggers on ``events`` (and, on PostgreSQL, the TRUNCATE trigger and the
    trigger functions); names come from the calling module's constants, never from input."""
    if conn.dialect.name == "postgresql":
        for name in (*triggers, truncate_trigger):
            conn.exec_driver_sql(f"DROP TRIGGER IF EXISTS {name} ON events")
        for name in functions:
            conn.exec_driver_sql(f"DROP FUNCTION IF EXISTS {name}()")
    else:
        for name in triggers:
            conn.exec_driver_sql(f"DROP TRIGGER IF EXISTS {name}")
