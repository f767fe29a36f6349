"""Campaign metrics: counted in SQL, returned as pandas DataFrames.

Every figure is counted per ledger row (one recipient of one campaign), so "unique" always
means "distinct recipients". The definitions below are the only ones: the delivery report, the
breakdowns, the A/B comparison and the dashboards all use the counts of ``select_metric_counts``.
What happened to each recipient is read from the ``engagement`` summary (one row per ledger row
with events: its opens, clicks, bounces... by kind), which triggers on ``events`` keep equal to
a recount of the events (``mailkit.storage.engagement``); the counts are those of the events.

Counts
    recipients       ledger rows: everyone the campaign was snapshotted for.
    pending          queued + sending + deferred: not decided yet.
    accepted         messages the SMTP server accepted (250).
    rejected         messages the server refused permanently (5xx) for that recipient.
    expired          messages given up after their retries ran out (a bounce of kind expired).
    sent             messages with a final outcome: accepted + rejected + expired.
    hard_bounces     sent messages that did not reach the recipient: every ``bounce`` event
                     (kinds hard, rejected, expired), one per message however many reports
                     arrive. The delivery report calls this ``bounced``.
    soft_bounces     messages with a temporary failure reported (``soft_bounce`` event) that
                     did not end in a hard bounce; they are not in deliverability.
    delivered        accepted messages without a hard bounce (= sent − hard_bounces).
    openers          recipients with a human open — or a human click, since a click proves the
                     message was opened even when images were blocked.
    machine_openers  recipients whose only opens came from machines (image proxies, prefetch):
                     counted apart, never in the open rate.
    all_openers      openers + machine_openers.
    clickers         recipients with a human click (scanner clicks are flagged ``machine``).
    machine_clickers recipients whose only clicks came from machines.
    unsubscribes     recipients who unsubscribed.
    complaints       recipients who reported the message as spam (feedback loops).

Rates (percent; NaN when the denominator is zero, with a ``note`` saying why)
    deliverability       (1 − hard_bounces / sent) × 100   (到達率)
    open_rate            openers / delivered × 100
    machine_open_rate    machine_openers / delivered × 100
    click_rate           clickers / delivered × 100
    click_to_open_rate   clickers / openers × 100
    unsubscribe_rate     unsubscribes / delivered × 100
    complaint_rate       complaints / delivered × 100
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pandas as pd
from sqlalchemy import (
    ColumnElement,
    Engine,
    FromClause,
    Select,
    and_,
    case,
    func,
    select,
)

from ..storage.schema import PENDING_STATES, campaigns, engagement, messages
from .reading import connect_analytics

__all__ = [
    "COUNT_COLUMNS",
    "METRIC_DEFINITIONS",
    "RATE_COLUMNS",
    "add_rates",
    "fetch_metric_frame",
    "load_campaign_metrics",
    "load_metrics",
    "select_metric_counts",
]

#: Metric name → its definition, in dashboard order (also shown on every dashboard).
METRIC_DEFINITIONS: dict[str, str] = {
    "recipients": "ledger rows: everyone the campaign was snapshotted for",
    "pending": "queued + sending + deferred: not decided yet",
    "sent": "messages with a final outcome: accepted + rejected (5xx) + expired (retries ran out)",
    "hard_bounces": "sent messages that did not arrive: any bounce (hard, rejected, expired), "
    "once per message",
    "soft_bounces": "messages with a temporary failure reported that did not end in a hard bounce",
    "delivered": "accepted messages without a hard bounce (= sent − hard bounces)",
    "openers": "recipients with a human open or a human click (a click proves an open)",
    "machine_openers": "recipients whose only opens came from image proxies / prefetchers",
    "clickers": "recipients with a human click (link-scanner clicks are excluded)",
    "unsubscribes": "recipients who unsubscribed",
    "complaints": "recipients who reported the message as spam",
    "deliverability": "(1 − hard bounces / sent) × 100  (到達率)",
    "open_rate": "openers / delivered × 100",
    "machine_open_rate": "machine openers / delivered × 100",
    "click_rate": "clickers / delivered × 100",
    "click_to_open_rate": "clickers / openers × 100",
    "unsubscribe_rate": "unsubscribes / delivered × 100",
    "complaint_rate": "complaints / delivered × 100",
}

COUNT_COLUMNS = (
    "recipients",
    "pending",
    "accepted",
    "rejected",
    "expired",
    "sent",
    "hard_bounces",
    "soft_bounces",
    "delivered",
    "openers",
    "machine_openers",
    "all_openers",
    "clickers",
    "machine_clickers",
    "unsubscribes",
    "complaints",
)
RATE_COLUMNS = (
    "deliverability",
    "open_rate",
    "machine_open_rate",
    "click_rate",
    "click_to_open_rate",
    "unsubscribe_rate",
    "complaint_rate",
)
_ENGAGEMENT = ("bounce", "soft_bounce", "open", "click", "unsubscribe", "complaint")


def _engagement_flags() -> dict[str, ColumnElement[bool]]:
    """What happened to each ledger row, from its ``engagement`` summary row (see storage).

    The summary counts each recipient's events by kind; a recipient without a row has none.
    """
    g = engagement.c

    def happened(count: ColumnElement[int]) -> ColumnElement[bool]:
        return func.coalesce(count, 0) > 0

    return {
        "bounced": happened(g.bounces),
        "soft_bounced": happened(g.soft_bounces),
        # A human click proves a human open, so either makes an opener.
        "opened": happened(g.opens + g.clicks),
        "machine_opened": happened(g.machine_opens),
        "clicked": happened(g.clicks),
        "machine_clicked": happened(g.machine_clicks),
        "unsubscribed": happened(g.unsubscribes),
        "complained": happened(g.complaints),
    }


def select_metric_counts(
    campaign_ids: Sequence[int],
    key: ColumnElement[Any] | None = None,
    *,
    joined: FromClause | None = None,
    where: ColumnElement[bool] | None = None,
) -> Select[Any]:
    """The SELECT counting every metric of ``campaign_ids``, grouped by ``key`` (or not at all).

    ``joined`` replaces ``messages`` as the FROM clause when the key needs other tables (it
    must contain ``messages`` and keep one row per ledger row); ``where`` narrows the ledger
    rows counted (e.g. to a segment's members). The result has a ``key``
    column when grouped, then the counts of ``COUNT_COLUMNS`` except ``sent`` and
    ``all_openers``, which are sums of other columns (added by ``fetch_metric_frame``).
    """
    m = messages.c
    f = _engagement_flags()
    bounced = f["bounced"]
    failed = m.state == "failed"
    rejected = and_(failed, m.smtp_code >= 500)
    expired = and_(failed, func.coalesce(m.smtp_code, 0) < 500, bounced)

    def total(condition: ColumnElement[bool]) -> ColumnElement[int]:
        return func.coalesce(func.sum(case((condition, 1), else_=0)), 0)

    opened, clicked = f["opened"], f["clicked"]
    columns: list[ColumnElement[Any]] = [
        func.count().label("recipients"),
        total(m.state.in_(PENDING_STATES)).label("pending"),
        total(m.state == "sent").label("accepted"),
        total(rejected).label("rejected"),
        total(expired).label("expired"),
        total(and_(bounced, (m.state == "sent") | rejected | expired)).label("hard_bounces"),
        total(and_(f["soft_bounced"], ~bounced)).label("soft_bounces"),
        total(and_(m.state == "sent", ~bounced)).label("delivered"),
        total(opened).label("openers"),
        total(and_(f["machine_opened"], ~opened)).label("machine_openers"),
        total(clicked).label("clickers"),
        total(and_(f["machine_clicked"], ~clicked)).label("machine_clickers"),
        total(f["unsubscribed"]).label("unsubscribes"),
        total(f["complained"]).label("complaints"),
    ]
    g = engagement.c
    source = (joined if joined is not None else messages).outerjoin(
        engagement, and_(g.campaign_id == m.campaign_id, g.message_id == m.id)
    )
    query = select(*([key.label("key")] if key is not None else []), *columns).select_from(source)
    query = query.where(m.campaign_id.in_(list(campaign_ids)))
    if where is not None:
        query = query.where(where)
    return query.group_by(key) if key is not None else query


def _frame(result: Any) -> pd.DataFrame:
    frame = pd.DataFrame(result.all(), columns=list(result.keys()))
    counts = [c for c in frame.columns if c != "key"]
    frame[counts] = frame[counts].fillna(0).astype("int64")
    frame["sent"] = frame["accepted"] + frame["rejected"] + frame["expired"]
    frame["all_openers"] = frame["openers"] + frame["machine_openers"]
    return frame


def _rate(numerator: pd.Series, denominator: pd.Series) -> pd.Series:
    den = denominator.astype("float64")
    return numerator.astype("float64").div(den.where(den > 0)) * 100.0


def _note(counts: pd.Series) -> str | None:
    row = {k: int(v) for k, v in counts.items() if k in COUNT_COLUMNS}
    notes = []
    if row["recipients"] == 0:
        notes.append("no recipients yet (a draft, or an empty segment)")
    elif row["pending"] > 0:
        notes.append(
            f"still sending: {row['pending']} of {row['recipients']} recipients pending, "
            "figures will change"
        )
    if row["recipients"] > 0 and row["sent"] == 0:
        notes.append("nothing sent yet: rates are undefined")
    elif row["sent"] > 0 and row["delivered"] == 0:
        notes.append("nothing delivered: engagement rates are undefined")
    elif row["delivered"] > 0 and row["openers"] == 0:
        notes.append("no human opens recorded (images blocked, tracking off, or too early)")
    return "; ".join(notes) or None


def add_rates(counts: pd.DataFrame) -> pd.DataFrame:
    """Add ``RATE_COLUMNS`` and a ``note`` to a frame of ``COUNT_COLUMNS`` (see module doc)."""
    frame = counts.copy()
    frame["deliverability"] = 100.0 - _rate(frame["hard_bounces"], frame["sent"])
    frame["open_rate"] = _rate(frame["openers"], frame["delivered"])
    frame["machine_open_rate"] = _rate(frame["machine_openers"], frame["delivered"])
    frame["click_rate"] = _rate(frame["clickers"], frame["delivered"])
    frame["click_to_open_rate"] = _rate(frame["clickers"], frame["openers"])
    frame["unsubscribe_rate"] = _rate(frame["unsubscribes"], frame["delivered"])
    frame["complaint_rate"] = _rate(frame["complaints"], frame["delivered"])
    frame["note"] = pd.Series(
        [_note(row) for _, row in frame.iterrows()], index=frame.index, dtype="object"
    )
    return frame


def _ordered(frame: pd.DataFrame, leading: Sequence[str] = ()) -> pd.DataFrame:
    return frame[[*leading, *COUNT_COLUMNS, *RATE_COLUMNS, "note"]]


def fetch_metric_frame(
    db: Engine,
    campaign_ids: Sequence[int],
    key: ColumnElement[Any] | None = None,
    *,
    joined: FromClause | None = None,
    where: ColumnElement[bool] | None = None,
    name: str = "key",
) -> pd.DataFrame:
    """Run ``select_metric_counts`` and return counts and rates, indexed by ``name``."""
    query = select_metric_counts(campaign_ids, key, joined=joined, where=where)
    with connect_analytics(db) as conn:
        frame = _frame(conn.execute(query))
    frame = _ordered(add_rates(frame), ["key"] if key is not None else [])
    return frame.set_index("key").rename_axis(name) if key is not None else frame


def load_metrics(db: Engine, campaign_id: int) -> pd.DataFrame:
    """One campaign's metrics as a one-row DataFrame indexed by ``campaign_id``.

    Columns: the counts of ``COUNT_COLUMNS``, the rates of ``RATE_COLUMNS`` (percent, NaN when
    undefined) and ``note`` (why a rate is undefined, or that the campaign is still sending).
    See the module docstring or ``METRIC_DEFINITIONS`` for what each one counts.
    """
    frame = load_campaign_metrics(db, [campaign_id])
    return frame.drop(columns=["name", "status", "started_at"])


def load_campaign_metrics(
    db: Engine, campaign_ids: Sequence[int] | None = None, *, counted: pd.DataFrame | None = None
) -> pd.DataFrame:
    """Metrics of several campaigns (all when None), a row each, oldest first.

    Indexed by ``campaign_id``, with ``name``, ``status`` and ``started_at`` before the
    counts and rates of ``load_metrics``: the frame behind the cross-campaign trend. Drafts
    are included with zero counts. ``counted``: ``COUNT_COLUMNS`` already known for some of
    the campaigns (indexed by campaign id, e.g. the dashboard's own), not counted again.
    """
    c = campaigns.c
    query = select(c.id, c.name, c.status, c.started_at, c.created_at).order_by(
        func.coalesce(c.started_at, c.created_at), c.id
    )
    if campaign_ids is not None:
        query = query.where(c.id.in_(list(campaign_ids)))
    with connect_analytics(db) as conn:
        listed = conn.execute(query).all()
    if campaign_ids is not None and len(listed) < len(set(campaign_ids)):
        from ..errors import NotFoundError

        missing = sorted(set(campaign_ids) - {row.id for row in listed})
        raise NotFoundError("campaign", missing[0])
    known = counted[list(COUNT_COLUMNS)] if counted is not None else None
    ids = [row.id for row in listed if known is None or row.id not in known.index]
    counts = (
        fetch_metric_frame(db, ids, messages.c.campaign_id, name="campaign_id")
        if ids
        else pd.DataFrame(columns=[*COUNT_COLUMNS, *RATE_COLUMNS, "note"])
    )
    if known is not None:
        counts = pd.concat([counts[list(COUNT_COLUMNS)], known]) if ids else known
    info = pd.DataFrame(
        [(r.id, r.name, r.status, r.started_at) for r in listed],
        columns=["campaign_id", "name", "status", "started_at"],
    ).set_index("campaign_id")
    zeros = pd.DataFrame(0, index=info.index, columns=list(COUNT_COLUMNS))
    filled = counts[list(COUNT_COLUMNS)].reindex(info.index).fillna(zeros).astype("int64")
    frame = info.join(_ordered(add_rates(filled)))
    frame["started_at"] = pd.to_datetime(frame["started_at"], utc=True)
    return frame
