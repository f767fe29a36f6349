"""Breakdowns of one campaign's metrics: by attribute, segment, domain, variant, link and time.

Each returns a DataFrame with the counts and rates of ``metrics`` (same definitions), a row
per group, counted in SQL. Groups with no recipients do not appear; a missing attribute value is
the group ``(none)``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime, timedelta
from typing import Any, Literal

import pandas as pd
from sqlalchemy import (
    ColumnElement,
    Engine,
    Integer,
    and_,
    case,
    cast,
    func,
    literal,
    select,
)

from ..campaigns import load_campaign
from ..errors import NotFoundError
from ..segments import SegmentSpec, load_attribute_names, resolve_segment
from ..storage.schema import (
    campaign_variants,
    contact_attributes,
    contacts,
    events,
    links,
    messages,
)
from .metrics import COUNT_COLUMNS, RATE_COLUMNS, add_rates, fetch_metric_frame, load_metrics

__all__ = [
    "CARRIER_DOMAINS",
    "build_domain_group",
    "load_link_metrics",
    "load_metrics_by_attribute",
    "load_metrics_by_domain",
    "load_metrics_by_segment",
    "load_metrics_by_variant",
    "load_timeline",
]

#: Japanese mobile carriers' mail domains, grouped under the carrier's name.
CARRIER_DOMAINS: dict[str, str] = {
    "docomo.ne.jp": "docomo",
    "ezweb.ne.jp": "au",
    "au.com": "au",
    "softbank.ne.jp": "SoftBank",
    "i.softbank.jp": "SoftBank",
}
OTHER = "(other)"
NONE = "(none)"
UNASSIGNED = "(unassigned)"


def build_domain_group(domain: ColumnElement[str | None]) -> ColumnElement[str]:
    """SQL: the carrier name for carrier domains, else the domain itself (``(none)`` if NULL)."""
    by_carrier: dict[str, list[str]] = {}
    for dom, carrier in CARRIER_DOMAINS.items():
        by_carrier.setdefault(carrier, []).append(dom)
    whens = [(domain.in_(doms), literal(carrier)) for carrier, doms in by_carrier.items()]
    return case(*whens, else_=func.coalesce(domain, NONE))


def _collapse_tail(frame: pd.DataFrame, top: int | None, name: str) -> pd.DataFrame:
    """Keep the ``top`` largest groups; sum the rest into one ``(other)`` row."""
    frame = frame.sort_values(["recipients", name], ascending=[False, True], kind="stable")
    if top is None or len(frame) <= top:
        return frame
    head, tail = frame.iloc[:top], frame.iloc[top:]
    rest = tail[list(COUNT_COLUMNS)].sum().to_frame().T.astype("int64")
    rest.index = pd.Index([OTHER], name=name)
    return pd.concat([head, add_rates(rest)[head.columns]])


def _sorted_frame(frame: pd.DataFrame, name: str) -> pd.DataFrame:
    return frame.rename_axis(name).sort_values(
        ["recipients", name], ascending=[False, True], kind="stable"
    )


def load_metrics_by_domain(
    db: Engine, campaign_id: int, *, group_carriers: bool = True, top: int | None = 15
) -> pd.DataFrame:
    """Metrics per recipient domain, carriers grouped (docomo, au, SoftBank), largest first.

    With ``top``, domains beyond the ``top`` largest are summed into one ``(other)`` row.
    """
    load_campaign(db, campaign_id)
    domain = messages.c.domain
    key = build_domain_group(domain) if group_carriers else func.coalesce(domain, NONE)
    frame = fetch_metric_frame(db, [campaign_id], key, name="domain")
    return _collapse_tail(_sorted_frame(frame, "domain"), top, "domain")


def load_metrics_by_attribute(
    db: Engine, campaign_id: int, key: str, *, top: int | None = 50
) -> pd.DataFrame:
    """Metrics per value of a contact attribute (e.g. ``prefecture``), largest group first.

    Recipients without the attribute form the ``(none)`` group. Values are the attributes'
    current values, not those at sending time.
    """
    load_campaign(db, campaign_id)
    if key not in load_attribute_names(db):
        raise NotFoundError("attribute", key)
    ca = contact_attributes.alias("attr")
    joined = messages.outerjoin(ca, and_(ca.c.contact_id == messages.c.contact_id, ca.c.key == key))
    value = func.coalesce(ca.c.value, NONE)
    frame = fetch_metric_frame(db, [campaign_id], value, joined=joined, name=key)
    return _collapse_tail(_sorted_frame(frame, key), top, key)


def load_metrics_by_segment(
    db: Engine, campaign_id: int, segments: Mapping[str, SegmentSpec] | Sequence[str]
) -> pd.DataFrame:
    """Metrics of the campaign's recipients who are members of each segment, a row each.

    ``segments`` maps a label to a segment (expression, ids or DataFrame), or is a list of
    expressions used as their own labels. Membership is evaluated now, and like every segment
    it leaves out suppressed addresses: recipients who hard-bounced or unsubscribed since are
    in no segment, so read bounce and unsubscribe rates from the attribute breakdowns.
    """
    load_campaign(db, campaign_id)
    named = dict(segments) if isinstance(segments, Mapping) else {s: s for s in segments}
    parts = []
    for label, spec in named.items():
        segment = resolve_segment(db, spec)
        member = messages.c.contact_id.in_(select(contacts.c.id).where(segment.clause))
        part = fetch_metric_frame(db, [campaign_id], where=member)
        parts.append(part.assign(segment=label).set_index("segment"))
    if not parts:
        return pd.DataFrame(columns=[*COUNT_COLUMNS, *RATE_COLUMNS, "note"]).rename_axis("segment")
    return pd.concat(parts)


def load_metrics_by_variant(db: Engine, campaign_id: int) -> pd.DataFrame:
    """Metrics per A/B variant, in the order the variants were added.

    Held-back recipients of a test that has no winner yet form the ``(unassigned)`` group.
    """
    load_campaign(db, campaign_id)
    key = func.coalesce(messages.c.variant, UNASSIGNED)
    frame = fetch_metric_frame(db, [campaign_id], key, name="variant")
    with db.connect() as conn:
        names = list(
            conn.execute(
                select(campaign_variants.c.name)
                .where(campaign_variants.c.campaign_id == campaign_id)
                .order_by(campaign_variants.c.id)
            ).scalars()
        )
    return _order_variants(frame, names)


def _order_variants(frame: pd.DataFrame, names: Sequence[str]) -> pd.DataFrame:
    """Variants in the order they were added, then any other group (``(unassigned)``)."""
    order = [n for n in names if n in frame.index] + sorted(set(frame.index) - set(names))
    return frame.loc[order]


def load_link_metrics(
    db: Engine, campaign_id: int, *, delivered: int | None = None
) -> pd.DataFrame:
    """Clicks per tracked link, by position in the message.

    Columns: ``url``; ``clicks`` (human click events), ``clickers`` (distinct recipients with a
    human click on it), ``machine_clicks`` (scanner click events); ``click_share`` = clicks /
    all human clicks of the campaign × 100; ``click_rate`` = clickers / delivered × 100.
    Pass ``delivered`` when it is known already, to save counting it again.
    """
    if delivered is None:
        delivered = int(load_metrics(db, campaign_id)["delivered"].iloc[0])
    e, lk = events.c, links.c
    is_click = and_(e.campaign_id == lk.campaign_id, e.type == "click", e.link_id == lk.id)
    human = and_(is_click, e.machine.is_(False))
    query = (
        select(
            lk.position,
            lk.url,
            func.coalesce(func.sum(case((human, 1), else_=0)), 0).label("clicks"),
            func.count(func.distinct(case((human, e.message_id)))).label("clickers"),
            func.coalesce(func.sum(case((e.machine.is_(True), 1), else_=0)), 0).label(
                "machine_clicks"
            ),
        )
        .select_from(links.outerjoin(events, is_click))
        .where(lk.campaign_id == campaign_id)
        .group_by(lk.id, lk.position, lk.url)
        .order_by(lk.position)
    )
    with db.connect() as conn:
        result = conn.execute(query)
        frame = pd.DataFrame(result.all(), columns=list(result.keys())).set_index("position")
    for column in ("clicks", "clickers", "machine_clicks"):
        frame[column] = frame[column].astype("int64")
    total = frame["clicks"].sum()
    frame["click_share"] = frame["clicks"] / total * 100.0 if total else float("nan")
    frame["click_rate"] = frame["clickers"] / delivered * 100.0 if delivered else float("nan")
    return frame


Unit = Literal["hour", "day"]
_SECONDS: dict[str, int] = {"hour": 3600, "day": 86400}


def _bucket(column: Any, start: datetime, size: int, dialect: str) -> ColumnElement[int]:
    """SQL: whole ``size``-second periods from ``start`` to ``column`` (0 for earlier ones)."""
    if dialect == "sqlite":
        seconds = cast(func.strftime("%s", column), Integer) - int(start.timestamp())
        periods: ColumnElement[Any] = cast(seconds / size, Integer)
    else:
        seconds = func.extract("epoch", column) - start.timestamp()
        periods = cast(func.floor(seconds / size), Integer)
    return case((periods < 0, 0), else_=periods)


def _reference_time(db: Engine, campaign_id: int) -> datetime | None:
    campaign = load_campaign(db, campaign_id)
    if campaign.started_at is not None:
        return campaign.started_at
    with db.connect() as conn:
        first: datetime | None = conn.execute(
            select(func.min(messages.c.sent_at)).where(messages.c.campaign_id == campaign_id)
        ).scalar_one()
    return first


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
    if unit not in _SECONDS:
        raise ValueError(f"unit must be 'hour' or 'day', not {unit!r}")
    size = _SECONDS[unit]
    columns = [
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
    start = _reference_time(db, campaign_id)
    empty = pd.DataFrame(columns=columns).rename_axis("since")
    if start is None:
        return empty
    dialect = db.dialect.name
    e = events.c
    human, machine = e.machine.is_(False), e.machine.is_(True)

    def count(condition: ColumnElement[bool]) -> ColumnElement[int]:
        return func.coalesce(func.sum(case((condition, 1), else_=0)), 0)

    bucket = _bucket(e.occurred_at, start, size, dialect).label("since")
    per_event = (
        select(
            bucket,
            count(and_(e.type == "open", human)).label("opens"),
            count(and_(e.type == "open", machine)).label("machine_opens"),
            count(and_(e.type == "click", human)).label("clicks"),
            count(and_(e.type == "click", machine)).label("machine_clicks"),
            count(e.type == "unsubscribe").label("unsubscribes"),
        )
        .where(e.campaign_id == campaign_id, e.type.in_(("open", "click", "unsubscribe")))
        .group_by(bucket)
    )
    firsts = (
        select(
            e.message_id,
            func.min(e.occurred_at).label("first_open"),
            func.min(case((e.type == "click", e.occurred_at))).label("first_click"),
        )
        .where(e.campaign_id == campaign_id, e.type.in_(("open", "click")), human)
        .group_by(e.message_id)
        .subquery()
    )
    open_bucket = _bucket(firsts.c.first_open, start, size, dialect).label("open_since")
    click_bucket = _bucket(firsts.c.first_click, start, size, dialect).label("click_since")
    with db.connect() as conn:
        result = conn.execute(per_event)
        frames = [pd.DataFrame(result.all(), columns=list(result.keys())).set_index("since")]
        # One pass over the first opens and clicks; clicks without a bucket are None.
        pairs = pd.DataFrame(
            conn.execute(
                select(open_bucket, click_bucket, func.count()).group_by(open_bucket, click_bucket)
            ).all(),
            columns=["open_since", "click_since", "n"],
        )
    for column, label in (("open_since", "new_openers"), ("click_since", "new_clickers")):
        counted = pairs.dropna(subset=[column]).groupby(column)["n"].sum()
        counted.index = counted.index.astype("int64")
        frames.append(counted.rename(label).to_frame())
    if all(f.empty for f in frames):
        return empty
    last = max(int(f.index.max()) for f in frames if not f.empty)
    frame = pd.concat(frames, axis=1).reindex(range(last + 1)).fillna(0).astype("int64")
    frame.index.name = "since"
    if delivered is None:
        delivered = int(load_metrics(db, campaign_id)["delivered"].iloc[0])
    frame["openers"] = frame["new_openers"].cumsum()
    frame["clickers"] = frame["new_clickers"].cumsum()
    den = float(delivered) if delivered else float("nan")
    frame["open_rate"] = frame["openers"] / den * 100.0
    frame["click_rate"] = frame["clickers"] / den * 100.0
    frame.insert(0, "start", [start + timedelta(seconds=size * i) for i in frame.index])
    frame["start"] = pd.to_datetime(frame["start"], utc=True)
    return frame[columns]
