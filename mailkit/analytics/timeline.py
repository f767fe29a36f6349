"""Engagement over time: events and first opens per hour (or day) since a campaign started.

Periods are whole ``size``-second spans from the campaign's start (on SQLite, from its start
truncated to the second, as SQLite's ``strftime('%s')`` counts). Instead of computing a period
for each of millions of events, the events are summed per period from ``event_minutes`` (kept
per campaign, type, machine flag and minute by triggers, see ``storage.event_minutes``); only
the minutes that period edges cut in two are counted from the index
``ix_events_campaign_type_time``. First opens and clicks come from the ``engagement`` summary.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any, Literal

import pandas as pd
from sqlalchemy import (
    ColumnClause,
    Connection,
    Engine,
    Integer,
    column,
    func,
    select,
    values,
)

from ..campaigns import load_campaign
from ..storage.schema import UTCDateTime, engagement, event_minutes, events, messages
from .metrics import load_metrics
from .reading import connect_analytics

__all__ = ["Unit", "load_timeline"]

Unit = Literal["hour", "day"]
_SECONDS: dict[str, int] = {"hour": 3600, "day": 86400}
_COLUMNS = [
    "start",
    "opens",
    "machine_opens",
    "clicks",
    "machine_clicks",
    "unsubscribes",
    "new_openers",
    "new_clickers",
    "openers",
    "clickers",
    "open_rate",
    "click_rate",
]
# Event counts per period: column → (type, machine) slices of the index, summed.
_EVENT_COUNTS: dict[str, tuple[tuple[str, bool], ...]] = {
    "opens": (("open", False),),
    "machine_opens": (("open", True),),
    "clicks": (("click", False),),
    "machine_clicks": (("click", True),),
    "unsubscribes": (("unsubscribe", False), ("unsubscribe", True)),
}
_EARLIEST = datetime(1, 1, 2, tzinfo=UTC)
_LATEST = datetime(9999, 12, 30, tzinfo=UTC)
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_SECOND = timedelta(seconds=1)


def _whole_seconds(moment: datetime) -> int:
    """Seconds since the epoch, truncated (exact: no float rounding of microseconds)."""
    return (moment - _EPOCH) // _SECOND


def _period_of(moment: datetime, start: datetime, size: int, dialect: str) -> int:
    """The period of ``moment``: the number of period starts (``_period_start``) ≤ it."""
    if dialect == "sqlite":
        return max(0, (_whole_seconds(moment) - _whole_seconds(start)) // size)
    return max(0, (moment - start) // timedelta(seconds=size))


def _period_start(k: int, start: datetime, size: int, dialect: str) -> datetime:
    """The first moment of period ``k`` ≥ 1.

    On SQLite periods count from the start truncated to the second (the seconds SQLite's
    ``strftime('%s')`` counted before), on PostgreSQL from the exact start.
    """
    if dialect == "sqlite":
        return _EPOCH + timedelta(seconds=_whole_seconds(start) + k * size)
    return start + timedelta(seconds=k * size)


def _reference_time(db: Engine, campaign_id: int) -> datetime | None:
    campaign = load_campaign(db, campaign_id)
    if campaign.started_at is not None:
        return campaign.started_at
    with connect_analytics(db) as conn:
        first: datetime | None = conn.execute(
            select(func.min(messages.c.sent_at)).where(messages.c.campaign_id == campaign_id)
        ).scalar_one()
    return first


def _last_event(conn: Connection, campaign_id: int) -> datetime | None:
    """The latest open, click or unsubscribe: one index probe per (type, machine).

    Ordered by every column of ``ix_events_campaign_type_time`` so that PostgreSQL probes it
    rather than scanning ``ix_events_campaign_occurred`` backwards for a slice with no rows.
    """
    e = events.c
    latest = [
        select(e.occurred_at)
        .where(e.campaign_id == campaign_id, e.type == kind, e.machine == machine)
        .order_by(e.campaign_id.desc(), e.type.desc(), e.machine.desc(), e.occurred_at.desc())
        .limit(1)
        .scalar_subquery()
        for slices in _EVENT_COUNTS.values()
        for kind, machine in slices
    ]
    found = [t for t in conn.execute(select(*latest)).one() if t is not None]
    return max(found) if found else None


def _count_per_period(
    conn: Connection, campaign_id: int, start: datetime, size: int, last: int
) -> pd.DataFrame:
    """Every count column of the timeline for periods ``0..last``, by index range sums.

    Per period and column, correlated sums over ranges of indexes, so the database never
    computes a period per event: the whole minutes of the period from ``event_minutes``, and
    first opens and clicks from ``ix_engagement_first_open``/``_first_click``. When the
    periods do not start on a whole minute (a campaign starts at any moment), the minute
    each period edge falls in is split: its events from the edge on are counted from
    ``ix_events_campaign_type_time`` and moved to the later period.
    """
    dialect = conn.dialect.name
    edges = [_EARLIEST, *(_period_start(k, start, size, dialect) for k in range(1, last + 1))]
    # Periods are whole minutes long: every edge is as far past its minute as the first one.
    offset = edges[-1] - edges[-1].replace(second=0, microsecond=0)
    split = last > 0 and offset > timedelta(0)
    bounds = list(zip(edges, [*edges[1:], _LATEST], strict=True))
    columns: list[ColumnClause[Any]] = [
        column("k", Integer),
        column("lo", UTCDateTime()),
        column("hi", UTCDateTime()),
    ]
    data: list[tuple[Any, ...]] = [(k, lo, hi) for k, (lo, hi) in enumerate(bounds)]
    if split:
        minute = timedelta(minutes=1)

        def minute_end(edge: datetime) -> datetime:
            # The first and last edges are whole minutes: nothing to split there.
            return edge if edge in (_EARLIEST, _LATEST) else edge - offset + minute

        columns += [column("lo_end", UTCDateTime()), column("hi_end", UTCDateTime())]
        data = [(*row, minute_end(row[1]), minute_end(row[2])) for row in data]
    rows = values(*columns, name="periods").data(data)
    periods = rows.cte("periods")  # SQLite takes VALUES with column names only in a CTE
    e, g, p, mm = events.c, engagement.c, periods.c, event_minutes.c

    def in_range(aggregate: Any, when: Any, lo: Any, hi: Any, *conditions: Any) -> Any:
        return (
            select(aggregate)
            .where(*conditions, when >= lo, when < hi)
            .correlate(periods)
            .scalar_subquery()
        )

    def count_slice(kind: str, machine: bool) -> Any:
        whole = func.coalesce(
            in_range(
                func.sum(mm.events), mm.minute, p.lo, p.hi,
                mm.campaign_id == campaign_id, mm.type == kind, mm.machine == machine,
            ),
            0,
        )  # fmt: skip
        if not split:
            return whole
        slice_ = (e.campaign_id == campaign_id, e.type == kind, e.machine == machine)
        head = in_range(func.count(), e.occurred_at, p.lo, p.lo_end, *slice_)
        tail = in_range(func.count(), e.occurred_at, p.hi, p.hi_end, *slice_)
        return whole + head - tail

    counts: list[Any] = []
    for name, slices in _EVENT_COUNTS.items():
        parts = [count_slice(kind, machine) for kind, machine in slices]
        total = parts[0] if len(parts) == 1 else parts[0] + parts[1]
        counts.append(total.label(name))
    # Recipients whose first human open (or click) fell in the period, from the summary.
    first_open = in_range(func.count(), g.first_open_at, p.lo, p.hi, g.campaign_id == campaign_id)
    first_click = in_range(func.count(), g.first_click_at, p.lo, p.hi, g.campaign_id == campaign_id)
    counts += [first_open.label("new_openers"), first_click.label("new_clickers")]
    result = conn.execute(select(p.k, *counts).order_by(p.k))
    frame = pd.DataFrame(result.all(), columns=list(result.keys())).set_index("k")
    return frame.astype("int64").rename_axis("since")


def load_timeline(
    db: Engine, campaign_id: int, *, unit: Unit = "hour", delivered: int | None = None
) -> pd.DataFrame:
    """Engagement per hour (or day) since the campaign started sending.

    A row per period ``since`` = 0, 1, ... (its start time in ``start``) up to the last event:
    ``opens`` / ``machine_opens`` / ``clicks`` / ``machine_clicks`` / ``unsubscribes`` count
    events; ``new_openers`` and ``new_clickers`` count recipients whose first human open (or
    click) fell in the period; ``openers``, ``clickers``, ``open_rate`` and ``click_rate`` are
    cumulative (rates over delivered, as in ``load_metrics``; pass ``delivered`` when it is
    known already). Empty before anything happened.
    """
    frame = _load_timeline_counts(db, campaign_id, unit)
    if frame.empty:
        return frame
    if delivered is None:
        delivered = int(load_metrics(db, campaign_id)["delivered"].iloc[0])
    return _add_timeline_rates(frame, delivered)


def _load_timeline_counts(db: Engine, campaign_id: int, unit: Unit) -> pd.DataFrame:
    """``load_timeline`` with NaN rates (they need the delivered count; see below)."""
    if unit not in _SECONDS:
        raise ValueError(f"unit must be 'hour' or 'day', not {unit!r}")
    size = _SECONDS[unit]
    start = _reference_time(db, campaign_id)
    empty = pd.DataFrame(columns=_COLUMNS).rename_axis("since")
    if start is None:
        return empty
    with connect_analytics(db) as conn:
        latest = _last_event(conn, campaign_id)
        if latest is None:
            return empty
        last = _period_of(latest, start, size, conn.dialect.name)
        frame = _count_per_period(conn, campaign_id, start, size, last)
    frame["openers"] = frame["new_openers"].cumsum()
    frame["clickers"] = frame["new_clickers"].cumsum()
    frame["open_rate"] = float("nan")
    frame["click_rate"] = float("nan")
    frame.insert(0, "start", [start + timedelta(seconds=size * i) for i in frame.index])
    frame["start"] = pd.to_datetime(frame["start"], utc=True)
    return frame[_COLUMNS]


def _add_timeline_rates(frame: pd.DataFrame, delivered: int) -> pd.DataFrame:
    """Cumulative open and click rates over ``delivered`` (NaN when nothing was)."""
    if frame.empty:
        return frame
    frame = frame.copy()
    den = float(delivered) if delivered else float("nan")
    frame["open_rate"] = frame["openers"] / den * 100.0
    frame["click_rate"] = frame["clickers"] / den * 100.0
    return frame
