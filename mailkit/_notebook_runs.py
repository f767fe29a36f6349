"""Dispatch and scheduled runs for notebooks (re-exported by ``mailkit.notebook``)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import Engine, select

from .campaigns import Campaign, create_campaign, load_campaign
from .config import load_settings
from .dispatch import (
    SendResult,
    count_states,
    load_dkim_signer,
    parse_smtp_url,
    send_campaign,
)
from .dispatch.pacing import unpaced_rules
from .errors import CampaignError, ConfigError, NotFoundError
from .segments import count_segment
from .storage import connect_for_reading
from .storage.schema import campaigns, utcnow
from .templates import load_template

__all__ = [
    "DispatchPlan",
    "describe_smtp_target",
    "ensure_campaign",
    "find_campaign",
    "load_dispatch_plan",
    "parse_send_at",
    "resolve_smtp_url",
    "send_due_campaign",
    "unpaced_rules",
]


# -- SMTP servers without their secrets -------------------------------------------------------


def describe_smtp_target(smtp_url: str) -> str:
    """``security host:port`` of an SMTP URL: no user name, no password."""
    target = parse_smtp_url(smtp_url)
    return f"{target.security} {target.where}"


def resolve_smtp_url(smtp_url: str | None) -> str:
    """The SMTP URL to use: the one given, else ``MAILKIT_SMTP_URL``; ConfigError if neither.

    Notebooks take credentials from the environment (``MAILKIT_SMTP_URL`` or
    ``MAILKIT_SMTP_USER``/``MAILKIT_SMTP_PASSWORD``) so that papermill, which writes every
    parameter into the executed notebook, never sees them.
    """
    url = smtp_url or load_settings().smtp_url
    if not url:
        raise ConfigError(
            "no SMTP server: set MAILKIT_SMTP_URL (credentials in the environment, never in "
            "notebook parameters) or pass smtp_url"
        )
    return url


# -- dispatch ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class DispatchPlan:
    """What sending a campaign now would do.

    ``recipients`` is who would receive it: for a draft, the segment's members now (suppressed
    addresses excluded); for a started campaign, the ledger rows still pending (queued,
    sending, deferred). ``smtp`` is ``security host:port``, never credentials. ``dkim`` says
    whether messages will be DKIM-signed (``MAILKIT_DKIM_*`` configured).
    """

    campaign_id: int
    campaign: str
    status: str
    segment: str
    recipients: int
    from_addr: str
    reply_to: str | None
    dkim: bool
    send_at: datetime | None
    smtp: str | None

    @property
    def schedule(self) -> str:
        """``now`` or the ISO time the campaign is scheduled for."""
        return "now" if self.send_at is None else self.send_at.isoformat(timespec="minutes")


def load_dispatch_plan(db: Engine, campaign_id: int, smtp_url: str | None = None) -> DispatchPlan:
    """The dispatch plan of a campaign (see DispatchPlan)."""
    campaign = load_campaign(db, campaign_id)
    if campaign.status == "draft":
        recipients = count_segment(db, campaign.segment)
    else:
        states = count_states(db, campaign_id)
        recipients = states["queued"] + states["sending"] + states["deferred"]
    return DispatchPlan(
        campaign_id=campaign.id,
        campaign=campaign.name,
        status=campaign.status,
        segment=campaign.segment,
        recipients=recipients,
        from_addr=campaign.from_addr,
        reply_to=campaign.reply_to,
        dkim=load_dkim_signer() is not None,
        send_at=campaign.send_at,
        smtp=describe_smtp_target(smtp_url) if smtp_url else None,
    )


# -- scheduled runs ---------------------------------------------------------------------------


def ensure_campaign(
    db: Engine,
    name: str,
    *,
    template: str,
    segment: str,
    from_addr: str,
    reply_to: str | None = None,
    send_at: datetime | None = None,
) -> Campaign:
    """The newest campaign called ``name``, or a new draft with these settings.

    Made for cron: running the same scheduled notebook twice finds the campaign it created the
    first time instead of creating (and sending) another. A campaign of that name with another
    template or segment is an error, so a changed parameter is never silently ignored.
    """
    with db.connect() as conn:
        found = conn.execute(
            select(campaigns.c.id).where(campaigns.c.name == name.strip()).order_by(campaigns.c.id)
        ).scalars()
        existing = list(found)
    if not existing:
        return create_campaign(
            db,
            name,
            template=template,
            segment=segment,
            from_addr=from_addr,
            reply_to=reply_to,
            send_at=send_at,
        )
    campaign = load_campaign(db, existing[-1])
    tpl = load_template(db, campaign.template_id)
    if tpl.name != template.strip() or campaign.segment != segment:
        raise CampaignError(
            f"campaign {name!r} (id {campaign.id}) already exists with template {tpl.name!r} "
            f"and segment {campaign.segment!r}; give the new settings a new campaign name"
        )
    return campaign


def send_due_campaign(
    db: Engine,
    campaign_id: int,
    smtp_url: str,
    *,
    now: datetime | None = None,
    concurrency: int = 4,
    paced: bool = True,
) -> SendResult | None:
    """Send (or resume, or retry the deferred rows of) a campaign if it is due; else None.

    A campaign is due when it has no ``send_at`` or its ``send_at`` has passed. A finished
    campaign is returned as is (nothing is sent twice).
    """
    campaign = load_campaign(db, campaign_id)
    now = now or utcnow()
    if campaign.send_at is not None and campaign.send_at > now:
        return None
    pacing = None if paced else unpaced_rules()
    return send_campaign(db, campaign_id, smtp_url, concurrency=concurrency, pacing=pacing)


def find_campaign(db: Engine, name: str = "") -> Campaign:
    """The newest campaign called ``name`` (the newest of all when ``name`` is empty)."""
    query = select(campaigns.c.id).order_by(campaigns.c.id.desc()).limit(1)
    if name.strip():
        query = query.where(campaigns.c.name == name.strip())
    with connect_for_reading(db) as conn:
        found = conn.execute(query).scalar_one_or_none()
    if found is None:
        raise NotFoundError("campaign", name or "(any)")
    return load_campaign(db, int(found))


def parse_send_at(text: str) -> datetime | None:
    """``send_at`` from an ISO 8601 notebook parameter; "" means now (None).

    The time must carry its zone (``2026-12-01T09:00+09:00``): a campaign scheduled in an
    unknown zone would go out hours early or late.
    """
    if not text.strip():
        return None
    try:
        value = datetime.fromisoformat(text.strip())
    except ValueError:
        raise CampaignError(
            f"send_at {text!r} is not an ISO 8601 time; e.g. 2026-12-01T09:00+09:00"
        ) from None
    if value.tzinfo is None:
        raise CampaignError(f"send_at {text!r} has no time zone; e.g. 2026-12-01T09:00+09:00")
    return value
