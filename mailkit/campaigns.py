"""Campaigns: a template, a segment and a sender, and the per-recipient ledger they start.

A campaign is created as a ``draft``. Starting it snapshots its segment into the ``messages``
ledger (one row per recipient, state ``queued``) exactly once; from then on the ledger, not the
segment, decides who receives it, so contacts imported later do not join a running campaign.

States of a campaign::

    draft ──start──▶ sending ──all rows final──▶ finished
                       │  ▲
            stop rule  ▼  │ resume
                      paused
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import pandas as pd
from sqlalchemy import Connection, Engine, func, insert, literal, select, update

from .errors import CampaignError, NotFoundError
from .messages import parse_address
from .segments import compile_segment, load_attribute_names, select_members
from .storage import connect_for_reading
from .storage.schema import campaign_variants, campaigns, messages, templates, utcnow
from .templates import load_template

__all__ = [
    "Campaign",
    "create_campaign",
    "load_campaign",
    "load_campaigns",
    "snapshot_campaign",
]


@dataclass(frozen=True)
class Campaign:
    id: int
    name: str
    template_id: int
    template_version: int
    segment: str
    from_addr: str
    reply_to: str | None
    status: str
    status_reason: str | None
    snapshot_hash: str | None
    send_at: datetime | None
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    tracking: bool = True
    tracking_base_url: str | None = None
    timezone: str = "Asia/Tokyo"
    window_start: str | None = None
    window_end: str | None = None
    ab_seed: int | None = None
    ab_fraction: float | None = None
    ab_metric: str | None = None
    ab_winner: str | None = None

    @classmethod
    def from_row(cls, row: Any) -> Campaign:
        return cls(**{field: getattr(row, field) for field in cls.__dataclass_fields__})


def create_campaign(
    db: Engine,
    name: str,
    *,
    template: str | int,
    segment: str,
    from_addr: str,
    reply_to: str | None = None,
    send_at: datetime | None = None,
    tracking: bool = True,
    tracking_url: str | None = None,
) -> Campaign:
    """Create a draft campaign after checking its template, segment and addresses.

    The segment expression is compiled against the attributes in the store now, so a typo
    fails here rather than at send time. ``tracking`` turns open/click tracking on or off;
    ``tracking_url`` is the public URL of the tracking server (``mailkit serve``) the
    campaign's links point at (default: ``MAILKIT_TRACKING_URL`` when it sends).
    """
    if not name.strip():
        raise CampaignError("a campaign needs a name")
    tpl = load_template(db, template)
    compile_segment(segment, load_attribute_names(db))
    parse_address(from_addr, what="From")
    if reply_to:
        parse_address(reply_to, what="Reply-To")
    if tracking_url is not None:
        from .tracking.tracker import resolve_base_url

        tracking_url = resolve_base_url(tracking_url)
    if send_at is not None and send_at.tzinfo is None:
        raise CampaignError("send_at must be timezone-aware (e.g. 2026-12-01T09:00+09:00)")
    assert tpl.id is not None
    with db.begin() as conn:
        campaign_id = conn.execute(
            insert(campaigns)
            .values(
                name=name.strip(),
                template_id=tpl.id,
                template_version=tpl.version,
                segment=segment,
                from_addr=from_addr,
                reply_to=reply_to,
                status="draft",
                send_at=send_at,
                tracking=tracking,
                tracking_base_url=tracking_url,
                created_at=utcnow(),
            )
            .returning(campaigns.c.id)
        ).scalar_one()
    return load_campaign(db, campaign_id)


def load_campaign(db: Engine, campaign_id: int) -> Campaign:
    """The campaign with this id, or NotFoundError."""
    with connect_for_reading(db) as conn:
        row = conn.execute(select(campaigns).where(campaigns.c.id == campaign_id)).first()
    if row is None:
        raise NotFoundError("campaign", campaign_id)
    return Campaign.from_row(row)


def load_campaigns(db: Engine) -> pd.DataFrame:
    """Every campaign with its template name and ledger size, newest first."""
    recipients = (
        select(messages.c.campaign_id, func.count().label("recipients"))
        .group_by(messages.c.campaign_id)
        .subquery()
    )
    query = (
        select(
            campaigns.c.id,
            campaigns.c.name,
            templates.c.name.label("template"),
            campaigns.c.segment,
            campaigns.c.status,
            func.coalesce(recipients.c.recipients, 0).label("recipients"),
            campaigns.c.created_at,
            campaigns.c.finished_at,
        )
        .join(templates, templates.c.id == campaigns.c.template_id)
        .outerjoin(recipients, recipients.c.campaign_id == campaigns.c.id)
        .order_by(campaigns.c.id.desc())
    )
    with connect_for_reading(db) as conn:
        result = conn.execute(query)
        return pd.DataFrame(result.all(), columns=list(result.keys()))


def snapshot_campaign(
    db: Engine,
    campaign_id: int,
    *,
    assign_variants: bool = False,
    started_by: str | None = None,
) -> int:
    """Freeze the campaign's recipients into the ledger, once; return the ledger size.

    The insert and the status change are one transaction, so a crash leaves either a draft
    with no ledger or a sending campaign with its whole ledger. Calling it again changes nothing.
    With ``assign_variants`` an A/B campaign (two variants or more) also gets its recipients'
    variants in that same transaction (``variants.save_assignment``, with the seed and test
    fraction saved by ``save_ab_test``): no ledger ever exists without them. Without it, call
    ``assign_variants`` afterwards (e.g. to pick the seed then). ``started_by`` is the owner
    of the start claim (see ``dispatch.starting``), recorded as who started the campaign.
    """
    campaign = load_campaign(db, campaign_id)
    # Compiled before the transaction: on SQLite a second connection inside it would deadlock.
    segment = compile_segment(campaign.segment, load_attribute_names(db))
    with db.begin() as conn:
        if campaign.status == "draft":
            members = select_members(segment).subquery()
            now = utcnow()
            conn.execute(
                insert(messages).from_select(
                    [
                        "campaign_id",
                        "contact_id",
                        "email",
                        "domain",
                        "state",
                        "attempts",
                        "updated_at",
                    ],
                    select(
                        literal(campaign_id),
                        members.c.id,
                        members.c.email,
                        members.c.domain,
                        literal("queued"),
                        literal(0),
                        literal(now, type_=messages.c.updated_at.type),
                    ),
                )
            )
            ids = conn.execute(
                select(messages.c.contact_id)
                .where(messages.c.campaign_id == campaign_id)
                .order_by(messages.c.contact_id)
            ).scalars()
            digest = hashlib.sha256(",".join(map(str, ids)).encode()).hexdigest()
            changed = conn.execute(
                update(campaigns)
                .where(campaigns.c.id == campaign_id, campaigns.c.status == "draft")
                .values(
                    status="sending",
                    started_at=now,
                    snapshot_hash=digest,
                    start_owner=started_by,
                    start_claim_until=None,
                )
            ).rowcount
            if changed != 1:
                # Another process started it between our read and our write: undo ours.
                raise CampaignError(f"campaign {campaign_id} was started concurrently; retry")
            if assign_variants and _count_variants(conn, campaign_id) >= 2:
                from .variants import save_assignment  # variants imports this module

                save_assignment(conn, campaign_id)
        return int(
            conn.execute(
                select(func.count()).where(messages.c.campaign_id == campaign_id)
            ).scalar_one()
        )


def _count_variants(conn: Connection, campaign_id: int) -> int:
    query = select(func.count()).where(campaign_variants.c.campaign_id == campaign_id)
    return int(conn.execute(query).scalar_one())
