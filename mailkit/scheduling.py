"""Scheduling: ``send_at``, sending windows, and ``run_due`` for cron and papermill.

A draft campaign with a ``send_at`` is *scheduled*; ``run_due`` (``mailkit run-due``) starts it
once that time has come, and resumes every campaign that is ``sending`` and has recipients due
(queued, or deferred with a passed retry time). Run it from cron every minute: overlapping runs
claim different ledger rows, so they cooperate instead of duplicating anything::

    * * * * *  cd /srv/mail && MAILKIT_DB=sqlite:///mailkit.db mailkit run-due --smtp smtp://relay:25

Or keep ``mailkit worker`` processes running (``mailkit.dispatch.run_worker``): each makes
``run_due`` passes until it is stopped, and any number of them share the campaigns.

A campaign that was due *long* ago (``late_after``, 24 hours by default) is not sent without
an explicit confirmation (``confirm_late=[id]``, ``--confirm-late ID``): a database restored
from a backup must not mail last month's sale.

A sending window (``window_start``–``window_end``, e.g. 09:00–20:00, in the campaign's
``timezone``, Asia/Tokyo by default) is when the recipients may get mail: outside it nothing is
claimed and a running sender stops claiming when the window closes. A window whose start is
after its end runs over midnight (22:00–06:00).
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Collection
from dataclasses import dataclass
from datetime import datetime, time, timedelta
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from sqlalchemy import Engine, and_, exists, func, or_, select, update

from ._aio import run_sync
from .errors import (
    CampaignError,
    ConfigError,
    MailkitError,
    NotFoundError,
    SMTPDeliveryError,
    StorageError,
)
from .storage import connect_for_reading
from .storage.schema import campaigns, messages, utcnow

__all__ = [
    "DEFAULT_TIMEZONE",
    "DueCampaign",
    "DueRun",
    "SendingWindow",
    "find_due_campaigns",
    "format_local",
    "load_sending_window",
    "run_due",
    "run_due_async",
    "schedule_campaign",
    "set_sending_window",
]

DEFAULT_TIMEZONE = "Asia/Tokyo"
#: A campaign due longer ago than this needs an explicit confirmation to be sent.
DEFAULT_LATE_AFTER = timedelta(hours=24)
_HHMM = re.compile(r"([01]\d|2[0-3]):([0-5]\d)")


def _zone(name: str) -> ZoneInfo:
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise ConfigError(
            f"unknown time zone {name!r}; use an IANA name such as 'Asia/Tokyo'"
        ) from None


def _parse_hhmm(value: str, what: str) -> time:
    match = _HHMM.fullmatch(value.strip())
    if not match:
        raise ConfigError(f"{what} {value!r} must be a time like '09:00' (24-hour HH:MM)")
    return time(int(match.group(1)), int(match.group(2)))


@dataclass(frozen=True)
class SendingWindow:
    """Local times of day between which a campaign may send (``start == end``: never closed)."""

    start: time
    end: time
    timezone: str = DEFAULT_TIMEZONE

    def is_open(self, now: datetime) -> bool:
        """Whether ``now`` (aware) is inside the window."""
        local = now.astimezone(_zone(self.timezone)).time()
        if self.start == self.end:
            return True
        if self.start < self.end:
            return self.start <= local < self.end
        return local >= self.start or local < self.end

    def next_open(self, now: datetime) -> datetime:
        """When the window opens next (``now`` itself when it is open), as aware UTC."""
        if self.is_open(now):
            return now
        zone = _zone(self.timezone)
        local = now.astimezone(zone)
        opening = datetime.combine(local.date(), self.start, tzinfo=zone)
        if opening <= local:
            opening = datetime.combine(local.date() + timedelta(days=1), self.start, tzinfo=zone)
        return opening.astimezone(now.tzinfo)

    def describe(self) -> str:
        """``09:00–20:00 Asia/Tokyo``."""
        return f"{self.start:%H:%M}–{self.end:%H:%M} {self.timezone}"


def format_local(when: datetime, timezone: str = DEFAULT_TIMEZONE) -> str:
    """An aware time shown in ``timezone`` (Asia/Tokyo by default): ``2026-04-01 09:00 JST``."""
    return when.astimezone(_zone(timezone)).strftime("%Y-%m-%d %H:%M %Z")


def load_sending_window(db: Engine, campaign_id: int) -> SendingWindow | None:
    """The campaign's sending window, or None when it may send at any time."""
    c = campaigns.c
    with connect_for_reading(db) as conn:
        row = conn.execute(
            select(c.window_start, c.window_end, c.timezone).where(c.id == campaign_id)
        ).first()
    if row is None:
        raise NotFoundError("campaign", campaign_id)
    if not row.window_start or not row.window_end:
        return None
    return SendingWindow(
        _parse_hhmm(row.window_start, "window_start"),
        _parse_hhmm(row.window_end, "window_end"),
        row.timezone or DEFAULT_TIMEZONE,
    )


def schedule_campaign(db: Engine, campaign_id: int, send_at: datetime | None) -> None:
    """Set (or with None clear) when a draft campaign starts; ``send_at`` must be aware."""
    if send_at is not None and send_at.tzinfo is None:
        raise CampaignError(
            "send_at must be timezone-aware, e.g. datetime(2026, 4, 1, 9, 0, "
            "tzinfo=ZoneInfo('Asia/Tokyo')) or '2026-04-01T09:00+09:00'"
        )
    with db.begin() as conn:
        status = conn.execute(
            select(campaigns.c.status).where(campaigns.c.id == campaign_id)
        ).scalar_one_or_none()
        if status is None:
            raise NotFoundError("campaign", campaign_id)
        if status != "draft":
            raise CampaignError(
                f"campaign {campaign_id} is {status}; only a draft can be (re)scheduled"
            )
        conn.execute(update(campaigns).where(campaigns.c.id == campaign_id).values(send_at=send_at))


def set_sending_window(
    db: Engine,
    campaign_id: int,
    start: str | None,
    end: str | None,
    *,
    timezone: str = DEFAULT_TIMEZONE,
) -> SendingWindow | None:
    """Set the campaign's sending window (``"09:00"``, ``"20:00"``) or clear it (None, None)."""
    if (start is None) != (end is None):
        raise ConfigError("give both the window start and end (e.g. 09:00 and 20:00), or neither")
    _zone(timezone)
    window = None
    if start is not None and end is not None:
        window = SendingWindow(
            _parse_hhmm(start, "window start"), _parse_hhmm(end, "window end"), timezone
        )
    with db.begin() as conn:
        changed = conn.execute(
            update(campaigns)
            .where(campaigns.c.id == campaign_id)
            .values(
                window_start=f"{window.start:%H:%M}" if window else None,
                window_end=f"{window.end:%H:%M}" if window else None,
                timezone=timezone,
            )
        ).rowcount
    if not changed:
        raise NotFoundError("campaign", campaign_id)
    return window


@dataclass(frozen=True)
class DueCampaign:
    """A campaign ``run_due`` would send now; ``late``: due for longer than ``late_after``."""

    id: int
    name: str
    status: str
    due_since: datetime
    late: bool


def find_due_campaigns(
    db: Engine, *, now: datetime | None = None, late_after: timedelta = DEFAULT_LATE_AFTER
) -> list[DueCampaign]:
    """Scheduled drafts whose ``send_at`` has come, and ``sending`` campaigns with recipients
    due (queued, deferred past their retry time, or left ``sending`` by a run to recover).

    A draft is late when its ``send_at`` is more than ``late_after`` ago; a sending campaign
    when nothing happened in its ledger for that long. Paused campaigns are never due.
    """
    now = now or utcnow()
    c, m = campaigns.c, messages.c
    p = messages.alias("pending").c
    pending = or_(
        p.state.in_(("queued", "sending")),
        and_(p.state == "deferred", p.next_attempt_at <= now),
    )
    last_activity = select(func.max(m.updated_at)).where(m.campaign_id == c.id).scalar_subquery()
    with connect_for_reading(db) as conn:
        drafts = conn.execute(
            select(c.id, c.name, c.status, c.send_at)
            .where(c.status == "draft", c.send_at.is_not(None), c.send_at <= now)
            .order_by(c.send_at, c.id)
        ).all()
        sending = conn.execute(
            select(c.id, c.name, c.status, last_activity.label("active"))
            .where(c.status == "sending", exists().where(p.campaign_id == c.id, pending))
            .order_by(c.id)
        ).all()
    due: list[DueCampaign] = []
    for row in drafts:
        late = now - row.send_at > late_after
        due.append(DueCampaign(row.id, row.name, row.status, row.send_at, late))
    for row in sending:
        since: Any = row.active
        due.append(DueCampaign(row.id, row.name, row.status, since, now - since > late_after))
    return due


@dataclass(frozen=True)
class DueRun:
    """What ``run_due`` did with one due campaign: ``result`` (a SendResult) when it sent,
    else ``skipped`` says why not."""

    campaign: DueCampaign
    result: Any = None
    skipped: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "campaign_id": self.campaign.id,
            "name": self.campaign.name,
            "late": self.campaign.late,
            "result": self.result.to_dict() if self.result is not None else None,
            "skipped": self.skipped,
        }


async def run_due_async(
    db: Engine,
    smtp_url: str,
    *,
    now: datetime | None = None,
    confirm_late: Collection[int] = (),
    late_after: timedelta = DEFAULT_LATE_AFTER,
    skip: Collection[int] = (),
    stop: asyncio.Event | None = None,
    **send_options: Any,
) -> list[DueRun]:
    """Send every due campaign in turn (see ``find_due_campaigns``); safe to overlap.

    Late campaigns are skipped unless their id is in ``confirm_late``; campaigns in ``skip``
    are left alone (not reported). ``send_options`` go to ``send_campaign_async``
    (concurrency, dkim, tracker, clock, ...). A campaign whose send fails on its own (a
    preflight or template problem) is reported and the others still run. Once ``stop`` is
    set the current send ends cleanly and no further campaign is started.
    """
    from .dispatch.runner import send_campaign_async  # runner imports this module

    runs: list[DueRun] = []
    for campaign in find_due_campaigns(db, now=now, late_after=late_after):
        if stop is not None and stop.is_set():
            break
        if campaign.id in skip:
            continue
        if campaign.late and campaign.id not in confirm_late:
            runs.append(
                DueRun(
                    campaign,
                    skipped=(
                        f"due since {format_local(campaign.due_since)}, more than "
                        f"{late_after} ago (a restored database?); not sent. Confirm with "
                        f"--confirm-late {campaign.id} or reschedule it"
                    ),
                )
            )
            continue
        try:
            result = await send_campaign_async(db, campaign.id, smtp_url, stop=stop, **send_options)
        except (SMTPDeliveryError, StorageError):
            raise  # the relay or the database: every other campaign would fail the same way
        except MailkitError as exc:
            runs.append(DueRun(campaign, skipped=f"{type(exc).__name__}: {exc}"))
            continue
        runs.append(DueRun(campaign, result=result))
    return runs


def run_due(db: Engine, smtp_url: str, **options: Any) -> list[DueRun]:
    """Blocking ``run_due_async`` (also inside Jupyter's running loop)."""
    return run_sync(run_due_async(db, smtp_url, **options))
