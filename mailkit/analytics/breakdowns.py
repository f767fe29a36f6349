"""Breakdowns of one campaign's metrics: by attribute, segment, domain, variant, link and time.

Each returns a DataFrame with the counts and rates of ``metrics`` (same definitions), a row
per group, counted in SQL. Groups with no recipients do not appear; a missing attribute value is
the group ``(none)``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import pandas as pd
from sqlalchemy import (
    ColumnElement,
    Engine,
    and_,
    case,
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
from .reading import connect_analytics
from .timeline import Unit, load_timeline

__all__ = [
    "CARRIER_DOMAINS",
    "Unit",
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
    with connect_analytics(db) as conn:
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
    return _add_click_rate(_load_link_counts(db, campaign_id), delivered)


def _load_link_counts(db: Engine, campaign_id: int) -> pd.DataFrame:
    """``load_link_metrics`` without ``click_rate``, which needs the delivered count."""
    e, lk = events.c, links.c
    human = e.machine.is_(False)
    # The campaign's clicks per link first (a range of ``ix_events_campaign_type_time``, which
    # holds link and recipient), then the links: one pass over the clicks, not one per link.
    per_link = (
        select(
            e.link_id,
            func.sum(case((human, 1), else_=0)).label("clicks"),
            func.count(func.distinct(case((human, e.message_id)))).label("clickers"),
            func.sum(case((e.machine.is_(True), 1), else_=0)).label("machine_clicks"),
        )
        .where(e.campaign_id == campaign_id, e.type == "click")
        .group_by(e.link_id)
        .subquery("per_link")
    )
    c = per_link.c
    query = (
        select(
            lk.position,
            lk.url,
            func.coalesce(c.clicks, 0).label("clicks"),
            func.coalesce(c.clickers, 0).label("clickers"),
            func.coalesce(c.machine_clicks, 0).label("machine_clicks"),
        )
        .select_from(links.outerjoin(per_link, c.link_id == lk.id))
        .where(lk.campaign_id == campaign_id)
        .order_by(lk.position)
    )
    with connect_analytics(db) as conn:
        result = conn.execute(query)
        frame = pd.DataFrame(result.all(), columns=list(result.keys())).set_index("position")
    for column in ("clicks", "clickers", "machine_clicks"):
        frame[column] = frame[column].astype("int64")
    total = frame["clicks"].sum()
    frame["click_share"] = frame["clicks"] / total * 100.0 if total else float("nan")
    return frame


def _add_click_rate(frame: pd.DataFrame, delivered: int) -> pd.DataFrame:
    frame = frame.copy()
    frame["click_rate"] = frame["clickers"] / delivered * 100.0 if delivered else float("nan")
    return frame
