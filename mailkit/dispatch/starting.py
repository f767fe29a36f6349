"""Starting a draft campaign: one process preflights and snapshots it, the others wait and join.

Several ``mailkit worker`` processes, overlapping ``run-due`` runs or two ``campaign send``
calls may find the same draft due at once. Its preflight renders every recipient with every
variant (minutes for a million), so only one of them does it: each first tries to *claim the
start*, a conditional UPDATE of ``campaigns.start_owner`` and ``start_claim_until`` that matches
only a draft whose claim is free or expired, so exactly one of them wins. The winner renews
the claim while it works and the snapshot ends it (``start_owner`` stays, saying who started
the campaign). The others poll (``clock.sleep``) until the campaign is ``sending`` and join
it, or until the claim runs out, which only happens when its owner died (a crash, ``kill
-9``): then one of them claims the start and does it. A dead claimer delays the start by at
most ``START_CLAIM``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import ColumnElement, Engine, case, func, literal, or_, select, update
from sqlalchemy.exc import IntegrityError

from ..campaigns import Campaign, load_campaign, snapshot_campaign
from ..errors import CampaignError, NotFoundError
from ..scheduling import format_local
from ..segments import (
    MEMBER_COLUMNS,
    SegmentSpec,
    fetch_member_records,
    load_attribute_names,
    resolve_segment,
)
from ..storage.engine import connect_for_reading
from ..storage.schema import campaigns, contact_attributes, contacts, messages
from ..variants import assign_variants
from .ledger import new_worker_id, retire_worker_id
from .pacing import Clock
from .pipeline import CampaignContent, Tracker, preflight_campaign

__all__ = [
    "START_CLAIM",
    "StartClaim",
    "claim_start",
    "load_start_claim",
    "release_start",
    "renew_start",
    "start_draft",
]

#: How long a start claim holds without renewal; its owner renews it well before that.
START_CLAIM = timedelta(minutes=2)
#: How often a process waiting for another's start looks again.
_POLL_SECONDS = 0.25
#: Renew the claim after this many rendered recipients if a quarter of START_CLAIM passed.
_RENEW_EVERY = 256


@dataclass(frozen=True)
class StartClaim:
    """Where a campaign's start stands: its status, and who claims (or claimed) the start."""

    status: str
    owner: str | None
    until: datetime | None


@dataclass(frozen=True)
class Started:
    """What ``start_draft`` did: recipients it preflighted (0: another process started the
    campaign, or still is and ``note`` says so)."""

    preflighted: int
    note: str | None = None


class _LostClaim(CampaignError):
    """Our start claim ran out and another process took it (or started the campaign)."""


def claim_start(
    db: Engine, campaign_id: int, owner: str, *, now: datetime, ttl: timedelta = START_CLAIM
) -> bool:
    """Claim the start of a draft until ``now + ttl``; False when another live claim holds it
    or the campaign is no longer a draft."""
    c = campaigns.c
    with db.begin() as conn:
        changed = conn.execute(
            update(campaigns)
            .where(
                c.id == campaign_id,
                c.status == "draft",
                or_(c.start_claim_until.is_(None), c.start_claim_until <= now),
            )
            .values(start_owner=owner, start_claim_until=now + ttl)
        ).rowcount
    return bool(changed)


def renew_start(
    db: Engine, campaign_id: int, owner: str, *, now: datetime, ttl: timedelta = START_CLAIM
) -> bool:
    """Extend our claim to ``now + ttl``; False when it is no longer ours (we lost it)."""
    c = campaigns.c
    with db.begin() as conn:
        changed = conn.execute(
            update(campaigns)
            .where(c.id == campaign_id, c.status == "draft", c.start_owner == owner)
            .values(start_claim_until=now + ttl)
        ).rowcount
    return bool(changed)


def release_start(db: Engine, campaign_id: int, owner: str) -> None:
    """Give up our claim (the start failed), so that the next attempt need not wait for it."""
    c = campaigns.c
    with db.begin() as conn:
        conn.execute(
            update(campaigns)
            .where(c.id == campaign_id, c.status == "draft", c.start_owner == owner)
            .values(start_owner=None, start_claim_until=None)
        )


def load_start_claim(db: Engine, campaign_id: int) -> StartClaim:
    """The campaign's status and start claim."""
    c = campaigns.c
    with db.connect() as conn:
        row = conn.execute(
            select(c.status, c.start_owner, c.start_claim_until).where(c.id == campaign_id)
        ).first()
    if row is None:
        raise NotFoundError("campaign", campaign_id)
    return StartClaim(row.status, row.start_owner, row.start_claim_until)


class _ClaimKeeper:
    """Renews our claim while we work; raises _LostClaim once it is no longer ours."""

    def __init__(self, db: Engine, campaign_id: int, owner: str, clock: Clock) -> None:
        self.db, self.campaign_id, self.owner, self.clock = db, campaign_id, owner, clock
        self.renewed = clock.now()
        self.watched = 0

    def renew(self, *, force: bool = False) -> None:
        now = self.clock.now()
        if not force and now - self.renewed < START_CLAIM / 4:
            return
        if not renew_start(self.db, self.campaign_id, self.owner, now=now):
            raise _LostClaim(f"lost the start claim of campaign {self.campaign_id}")
        self.renewed = now

    def watch(self, records: Iterable[Mapping[str, Any]]) -> Iterator[Mapping[str, Any]]:
        """``records``, renewing the claim as the preflight goes through them."""
        for n, record in enumerate(records, 1):
            if n % _RENEW_EVERY == 0:
                self.renew()
            self.watched = n
            yield record


async def start_draft(
    db: Engine,
    campaign: Campaign,
    content: CampaignContent,
    tracker: Tracker | None,
    *,
    clock: Clock,
    max_wait: float,
    stop: asyncio.Event | None = None,
    processes: int = 1,
) -> Started:
    """Preflight and snapshot a draft (its variants assigned in the snapshot's transaction)
    if this process wins its start claim; else wait, up to ``max_wait`` seconds, for the
    process that holds it to start the campaign (then the caller joins the sending).

    A PreflightError (or any other failure of the start) releases the claim and propagates:
    nothing is snapshotted.
    """
    owner = new_worker_id()
    waited = 0.0
    try:
        while True:
            if claim_start(db, campaign.id, owner, now=clock.now()):
                try:
                    return Started(
                        _preflight_and_snapshot(
                            db, campaign, content, tracker, owner, clock, processes
                        )
                    )
                except _LostClaim:
                    pass  # a live process took over after our claim ran out: wait for it
            claim = load_start_claim(db, campaign.id)
            if claim.status != "draft":
                return Started(0)  # started (by another process): join it
            if waited >= max_wait or (stop is not None and stop.is_set()):
                until = format_local(claim.until) if claim.until is not None else "now"
                return Started(
                    0,
                    f"being started (preflight and snapshot) by {claim.owner}, whose claim "
                    f"holds until {until}; run again to join it",
                )
            pause = min(_POLL_SECONDS, max(max_wait - waited, 0.0))
            await clock.sleep(pause)
            waited += pause
    finally:
        retire_worker_id(owner)


def _preflight_and_snapshot(
    db: Engine,
    campaign: Campaign,
    content: CampaignContent,
    tracker: Tracker | None,
    owner: str,
    clock: Clock,
    processes: int = 1,
) -> int:
    keeper = _ClaimKeeper(db, campaign.id, owner, clock)
    try:
        proven = count_proven_members(db, campaign.segment, content, tracker)
        if proven is not None:
            keeper.watched = proven
        else:
            # Streamed: a million members as a DataFrame, then dicts, took 18 s and 1.3 GB.
            records = fetch_member_records(db, campaign.segment)
            preflight_campaign(content, keeper.watch(records), tracker=tracker, processes=processes)
        keeper.renew(force=True)  # the snapshot of a big segment takes a while too
    except _LostClaim:
        raise
    except BaseException:
        release_start(db, campaign.id, owner)
        raise
    try:
        snapshot_campaign(db, campaign.id, assign_variants=True, started_by=owner)
    except (CampaignError, IntegrityError):
        # Another process started it first (after our claim ran out): join it.
        if load_campaign(db, campaign.id).status == "draft":
            release_start(db, campaign.id, owner)
            raise
    except BaseException:
        release_start(db, campaign.id, owner)
        raise
    return keeper.watched


def count_proven_members(
    db: Engine, segment: SegmentSpec, content: CampaignContent, tracker: Tracker | None
) -> int | None:
    """The segment's size when every member surely renders with every template, decided in
    one SQL count; None when the members must be checked one by one.

    A proven template (``CompiledTemplate.infallible``) renders for every context that
    defines the variables it reads, and a member's context defines a field exactly when the
    member has a value for it (``build_context`` drops missing ones): so the preflight of
    proven templates is a question of which members lack a field. Asked in SQL, a campaign of
    5,000 starts 0.1 s sooner and one of a million does not stream every member through
    Python; any member lacking a field sends the preflight the long way, which names them.
    """
    templates = content.templates.values()
    if not all(t.infallible for t in templates):
        return None
    always = {"id", "email", "domain", "contact"}  # never missing (see build_context)
    if tracker is not None:
        always.add("unsubscribe_url")
    c, ca = contacts.c, contact_attributes.c
    attribute_names = load_attribute_names(db)
    lacking: list[ColumnElement[bool]] = []
    for name in sorted(frozenset().union(*(t.variables for t in templates)) - always):
        if name == "name":
            lacking.append(c.name.is_(None))
            continue
        # Nobody has it (the long way lists who fails); or "X_attr", fetch_members' column
        # for an attribute named like a built-in one, which imports refuse: the long way too.
        if name not in attribute_names or name.removesuffix("_attr") in MEMBER_COLUMNS:
            return None
        has = select(ca.contact_id).where(ca.contact_id == c.id, ca.key == name).exists()
        lacking.append(~has)
    resolved = resolve_segment(db, segment)
    # One pass over the segment counts both its members and those lacking a field.
    short = func.coalesce(func.sum(case((or_(*lacking), 1), else_=0)), 0) if lacking else literal(0)
    query = select(func.count(), short).select_from(contacts).where(resolved.clause)
    with connect_for_reading(db) as conn:
        members, lacking_any = conn.execute(query).one()
    return None if lacking_any else int(members)


def assign_variants_once(db: Engine, campaign_id: int, content: CampaignContent) -> None:
    """Deal the A/B variants of a ledger snapshotted without them (by ``snapshot_campaign``
    called directly, or by a version that assigned them in a later transaction and crashed
    in between): once, before anything is sent."""
    if len(content.templates) < 3:  # the campaign's own template plus at least two variants
        return
    m = messages.c
    with db.connect() as conn:
        touched = conn.execute(
            select(func.count()).where(
                m.campaign_id == campaign_id, or_(m.state != "queued", m.variant.is_not(None))
            )
        ).scalar_one()
    if touched:
        return
    try:
        assign_variants(db, campaign_id)
    except CampaignError:
        # A concurrent run may have assigned them first: nothing left to do then.
        if not _has_variants(db, campaign_id):
            raise


def _has_variants(db: Engine, campaign_id: int) -> bool:
    m = messages.c
    with db.connect() as conn:
        query = select(m.id).where(m.campaign_id == campaign_id, m.variant.is_not(None)).limit(1)
        return conn.execute(query).first() is not None
