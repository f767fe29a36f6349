"""Events per minute (``event_minutes``): kept equal to a recount by the triggers on every kind
of write, rebuilt to the same rows, and the timeline summed from it is the one counted event by
event, whether the periods start on a whole minute or inside one.

The world and the workload (batches, single events, a user's INSERT, an after-the-fact UPDATE,
DELETEs) are those of ``test_analytics_engagement``.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pandas as pd
import pytest
from sqlalchemy import Engine, delete, func, select, update
from test_analytics_engagement import START, at, build_ledger, write_workload

from mailkit.analytics import load_timeline, save_event
from mailkit.storage import open_db
from mailkit.storage.engagement import rebuild_engagement
from mailkit.storage.event_minutes import (
    TIMELINE_TYPES,
    rebuild_event_minutes,
    select_event_minute_rows,
)
from mailkit.storage.schema import campaigns, event_minutes, events

KEY = ["campaign_id", "type", "machine", "minute"]


def read_minutes(db: Engine) -> list[tuple[Any, ...]]:
    m = event_minutes.c
    with db.connect() as conn:
        rows = conn.execute(select(m.campaign_id, m.type, m.machine, m.minute, m.events)).all()
    return sorted(tuple(r) for r in rows)


def recount(db: Engine) -> list[tuple[Any, ...]]:
    with db.connect() as conn:
        rows = conn.execute(select_event_minute_rows(db.dialect.name)).all()
    return sorted(tuple(r) for r in rows)


def recount_in_pandas(db: Engine) -> list[tuple[Any, ...]]:
    """The same rows from the events read back into Python (minutes truncated here)."""
    e = events.c
    with db.connect() as conn:
        rows = conn.execute(
            select(e.campaign_id, e.type, e.machine, e.occurred_at).where(
                e.campaign_id.is_not(None), e.type.in_(TIMELINE_TYPES)
            )
        ).all()
    counts: dict[tuple[Any, ...], int] = {}
    for cid, kind, machine, when in rows:
        key = (cid, kind, bool(machine), when.replace(second=0, microsecond=0))
        counts[key] = counts.get(key, 0) + 1
    return sorted((*k, n) for k, n in counts.items())


def as_python(rows: list[tuple[Any, ...]]) -> list[tuple[Any, ...]]:
    return [(cid, kind, bool(machine), minute, n) for cid, kind, machine, minute, n in rows]


def test_the_minutes_match_a_recount_after_a_mixed_workload(db: Engine) -> None:
    cid, rows, link_ids = build_ledger(db)
    write_workload(db, cid, rows, link_ids)
    minutes = read_minutes(db)
    assert minutes == recount(db)
    assert as_python(minutes) == recount_in_pandas(db)
    total = sum(n for *_, n in minutes)
    with db.connect() as conn:
        events_counted = conn.execute(
            select(func.count()).where(events.c.type.in_(TIMELINE_TYPES))
        ).scalar_one()
    assert total == events_counted == 13  # 8 opens, 4 clicks, 1 unsubscribe
    # r1's click flagged a scanner after the fact: a machine click, no human one in its minute.
    first = START.replace(second=0, microsecond=0)
    flagged = [r for r in as_python(minutes) if r[1] == "click" and r[3] == first]
    assert flagged == [(cid, "click", True, first, 2)]  # with r0's scanner click at 5 s
    # Every minute row holds events: the deleted ones left no empty row behind.
    assert all(n > 0 for *_, n in minutes)


def test_updates_and_deletes_keep_the_minutes_true(db: Engine) -> None:
    cid, rows, link_ids = build_ledger(db)
    write_workload(db, cid, rows, link_ids)
    with db.begin() as conn:  # moves r0's opens to another minute
        conn.execute(
            update(events)
            .where(events.c.message_id == rows[0], events.c.type == "open")
            .values(occurred_at=at(7240))
        )
    save_event(db, cid, rows[2], "open", occurred_at=at(3600.5), machine=True)
    assert read_minutes(db) == recount(db)
    with db.begin() as conn:  # an event leaves the timeline's types, another joins them
        conn.execute(update(events).where(events.c.type == "unsubscribe").values(type="complaint"))
        conn.execute(update(events).where(events.c.type == "soft_bounce").values(type="open"))
    assert read_minutes(db) == recount(db)
    with db.begin() as conn:
        conn.execute(delete(events).where(events.c.message_id == rows[0]))
    assert read_minutes(db) == recount(db)
    assert as_python(read_minutes(db)) == recount_in_pandas(db)
    assert not [r for r in read_minutes(db) if r[1] == "unsubscribe"]


def test_rebuilding_the_minutes_changes_nothing(db: Engine) -> None:
    cid, rows, link_ids = build_ledger(db)
    write_workload(db, cid, rows, link_ids)
    before = read_minutes(db)
    rebuild_engagement(db, [cid])
    assert read_minutes(db) == before
    with db.begin() as conn:  # as after a load that bypassed the triggers
        conn.execute(delete(event_minutes))
    assert read_minutes(db) == []
    rebuild_event_minutes(db)
    assert read_minutes(db) == before
    with db.begin() as conn:
        conn.execute(delete(event_minutes))
    rebuild_engagement(db)
    assert read_minutes(db) == before


@pytest.mark.postgres
def test_truncating_the_events_empties_the_minutes(pg_url: str) -> None:
    # PostgreSQL only: SQLite has no TRUNCATE (its DELETE fires the row triggers, tested above).
    db = open_db(pg_url)
    try:
        cid, rows, link_ids = build_ledger(db)
        write_workload(db, cid, rows, link_ids)
        assert read_minutes(db)
        with db.begin() as conn:
            conn.exec_driver_sql("TRUNCATE events")
        assert read_minutes(db) == []
    finally:
        db.dispose()


def reference_timeline(db: Engine, cid: int, start: datetime, size: int) -> pd.DataFrame:
    """Event counts per period, each event placed in its period in Python."""
    e = events.c
    with db.connect() as conn:
        rows = conn.execute(
            select(e.type, e.machine, e.occurred_at).where(e.campaign_id == cid)
        ).all()
    names = {
        ("open", False): "opens",
        ("open", True): "machine_opens",
        ("click", False): "clicks",
        ("click", True): "machine_clicks",
        ("unsubscribe", False): "unsubscribes",
        ("unsubscribe", True): "unsubscribes",
    }
    counted = [
        (max(0, (when - start) // timedelta(seconds=size)), names[(kind, bool(machine))])
        for kind, machine, when in rows
        if (kind, bool(machine)) in names
    ]
    frame = pd.DataFrame(counted, columns=["since", "column"])
    return frame.groupby(["since", "column"]).size().unstack(fill_value=0)


@pytest.mark.parametrize("unit, size", [("hour", 3600), ("day", 86400)])
def test_the_timeline_of_a_start_on_a_whole_minute(db: Engine, unit: str, size: int) -> None:
    """Periods on whole minutes take whole minutes only (no edge split), the same counts."""
    cid, rows, link_ids = build_ledger(db)
    write_workload(db, cid, rows, link_ids)
    start = datetime(2026, 4, 1, 9, 0, tzinfo=UTC)
    assert start != START
    with db.begin() as conn:
        conn.execute(update(campaigns).where(campaigns.c.id == cid).values(started_at=start))
    timeline = load_timeline(db, cid, unit=unit)  # type: ignore[arg-type]
    expected = reference_timeline(db, cid, start, size)
    for column in expected.columns:
        got = timeline[column].loc[lambda s: s > 0].to_dict()
        want = expected[column].loc[lambda s: s > 0].to_dict()
        assert got == want, column
    assert int(timeline["opens"].sum()) == int(expected["opens"].sum()) > 0
    # An open at 3599.9 s and one at 3600 s fall either side of the first hour's edge.
    if unit == "hour":
        assert int(timeline.loc[0, "opens"]) >= 2 and int(timeline.loc[1, "opens"]) >= 1
