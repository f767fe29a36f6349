"""The outbox ledger: claiming rows, moving them through their states, recording outcomes.

What the database says is always what happened:

- A row is ``sending`` only while an SMTP transaction for it may be in flight. It is marked so
  (committed) before the transaction starts and leaves that state only with the server's answer
  or, after a crash, as ``unknown``. Each attempt carries its own Message-ID, and an outcome is
  written only over the attempt it belongs to.
- Rows are claimed with a lease (``lease_owner``, ``lease_expires_at``): ``SELECT … FOR UPDATE
  SKIP LOCKED`` on PostgreSQL, a ``BEGIN IMMEDIATE`` transaction on SQLite. A row is marked
  ``sending`` only by the owner of its lease, so two workers never send the same row.
- Owners are ``host:pid:nonce``. A worker on this host whose process is gone loses its rows at
  once; elsewhere, when its lease runs out. Its ``sending`` rows become ``unknown``: they may or
  may not have reached the server, so they are not re-sent unless the operator asks.

Marks and outcomes, the hot path, are committed in groups by ``commits.apply_ledger_ops``: a
worker never has more than one row ``sending``, so a crash leaves at most one ``unknown`` row
per connection.
"""

from __future__ import annotations

import functools
import os
import secrets
import socket
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Engine, Integer, Select, Update, and_, bindparam, func, or_, select, update

from ..storage.engine import connect_for_reading
from ..storage.schema import (
    LEDGER_STATES,
    PENDING_STATES,
    campaigns,
    contact_attributes,
    contacts,
    messages,
    suppressions,
    utcnow,
)
from ..variants import is_releasable

__all__ = [
    "DEFAULT_LEASE",
    "LedgerRow",
    "claim_rows",
    "count_bounce_sample",
    "count_states",
    "fetch_contact_contexts",
    "finish_if_done",
    "new_worker_id",
    "recover_stale_rows",
    "release_rows",
    "renew_leases",
    "requeue_unknown",
]

#: How long a claim protects rows from other workers when the owner cannot be checked.
DEFAULT_LEASE = timedelta(minutes=10)

# Owners alive in this process: a dead run of this same process (a cancelled notebook cell)
# is recognised by its owner id missing from here.
_LIVE_OWNERS: set[str] = set()


@dataclass(frozen=True)
class LedgerRow:
    """One claimed recipient of a campaign."""

    id: int
    contact_id: int
    email: str
    attempts: int
    state: str = "queued"
    variant: str | None = None
    domain: str | None = None

    @property
    def recipient_domain(self) -> str:
        """The recipient's domain, lower-case (from the ledger, else from the address)."""
        return (self.domain or self.email.rpartition("@")[2]).lower()


def new_worker_id() -> str:
    """A new owner id ``host:pid:nonce``, registered as alive in this process."""
    owner = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"
    _LIVE_OWNERS.add(owner)
    return owner


def retire_worker_id(owner: str) -> None:
    """Forget an owner id once its run is over (its rows were released)."""
    _LIVE_OWNERS.discard(owner)


def _owner_is_dead(owner: str | None) -> bool:
    """True when ``owner`` is a worker on this host whose process (or run) no longer exists."""
    if not owner:
        return True
    host, _, rest = owner.partition(":")
    pid_text = rest.partition(":")[0]
    if host != socket.gethostname() or not pid_text.isdigit():
        return False
    pid = int(pid_text)
    if pid == os.getpid():
        return not any(owner == live or owner.startswith(live + ":") for live in _LIVE_OWNERS)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def recover_stale_rows(db: Engine, campaign_id: int, *, now: datetime | None = None) -> int:
    """Mark ``sending`` rows of dead workers ``unknown``; free their other claims.

    A ``sending`` row may or may not have reached the server before its worker died, so it is
    never re-sent automatically. Returns the number of rows that became ``unknown``.
    """
    now = now or utcnow()
    # Only rows waiting or being sent hold leases (an outcome clears its row's lease): looked
    # up through the state index, a campaign's sent rows are never read, however many.
    leased = and_(
        messages.c.campaign_id == campaign_id,
        messages.c.state.in_(PENDING_STATES),
        messages.c.lease_owner.is_not(None),
    )
    with db.begin() as conn:
        owners = conn.execute(
            select(messages.c.lease_owner, func.max(messages.c.lease_expires_at))
            .where(leased)
            .group_by(messages.c.lease_owner)
        ).all()
        dead = [o for o, expires in owners if _owner_is_dead(o) or (expires and expires < now)]
        if not dead:
            return 0
        stale = and_(leased, messages.c.lease_owner.in_(dead))
        unknown = conn.execute(
            update(messages)
            .where(stale, messages.c.state == "sending")
            .values(
                state="unknown",
                smtp_reply="worker stopped during the SMTP transaction; outcome unknown",
                lease_owner=None,
                lease_expires_at=None,
                updated_at=now,
            )
        ).rowcount
        conn.execute(update(messages).where(stale).values(lease_owner=None, lease_expires_at=None))
        return int(unknown)


def requeue_unknown(db: Engine, campaign_id: int) -> int:
    """Put ``unknown`` rows back in the queue (the operator accepts possible duplicates)."""
    with db.begin() as conn:
        return int(
            conn.execute(
                update(messages)
                .where(messages.c.campaign_id == campaign_id, messages.c.state == "unknown")
                .values(state="queued", updated_at=utcnow())
            ).rowcount
        )


@functools.lru_cache(maxsize=2)
def _claim_statements(excluding: bool) -> tuple[Select[Any], Select[Any], Update]:
    """The claim's three statements, built once: with bound parameters (the id and domain lists
    expanding) they are the same objects on every claim, so SQLAlchemy neither rebuilds them
    nor recomputes their cache keys; that was most of a claim's CPU (6.6 ms per 64 rows, 0.6 ms
    of it in SQLite)."""
    m = messages.c
    now = bindparam("now", type_=m.lease_expires_at.type)
    # Not leased by a live worker, not held back by an A/B test that still waits for its
    # winner, not a domain another sender handles.
    free = and_(or_(m.lease_owner.is_(None), m.lease_expires_at < now), is_releasable())
    if excluding:
        free = and_(
            free, or_(m.domain.is_(None), m.domain.not_in(bindparam("excluded", expanding=True)))
        )
    campaign = m.campaign_id == bindparam("campaign_id")
    limit = bindparam("limit", type_=Integer)
    # Queued rows and due retries are looked up separately, each along its own index in the
    # order it keeps, so that a claim reads about ``limit`` rows however large the ledger:
    # one query over both states walked the campaign's rows in id order past every sent one
    # (at 200,000 recipients, 95 % sent: 57 ms per claim on SQLite, 197 ms on PostgreSQL).
    # PostgreSQL: concurrent claimers skip each other's locked rows instead of queueing on
    # them. SQLite ignores FOR UPDATE; BEGIN IMMEDIATE already makes this transaction exclusive.
    # The ids are fetched first: as an IN (subquery) PostgreSQL may re-run the LIMIT subquery
    # once per outer row and lease far more than ``limit`` rows.
    queued = (
        select(m.id)
        .where(campaign, m.state == "queued", free)
        .order_by(m.id)
        .limit(limit)
        .with_for_update(skip_locked=True)
    )
    retries = (
        select(m.id)
        .where(campaign, m.state == "deferred", m.next_attempt_at <= now, free)
        .order_by(m.next_attempt_at)
        .limit(limit)
        .with_for_update(skip_locked=True)
    )
    waiting = or_(m.state == "queued", and_(m.state == "deferred", m.next_attempt_at <= now))
    # By primary key alone: with the campaign's id in this condition too, SQLite went through
    # the campaign's index, i.e. through all of its rows.
    lease = (
        update(messages)
        .where(m.id.in_(bindparam("ids", expanding=True)), waiting, free)
        .values(lease_owner=bindparam("owner"), lease_expires_at=bindparam("expires"))
        .returning(m.id, m.contact_id, m.email, m.attempts, m.state, m.variant, m.domain)
    )
    return queued, retries, lease


def claim_rows(
    db: Engine,
    campaign_id: int,
    owner: str,
    limit: int,
    *,
    now: datetime | None = None,
    lease: timedelta = DEFAULT_LEASE,
    exclude_domains: Iterable[str] = (),
) -> list[LedgerRow]:
    """Lease up to ``limit`` due rows (queued, or deferred with a passed retry time), oldest
    first, skipping ``exclude_domains``. Rows leased by another live worker are never taken."""
    now = now or utcnow()
    excluded = sorted(set(exclude_domains))
    queued, retries, leasing = _claim_statements(bool(excluded))
    params: dict[str, Any] = {"campaign_id": campaign_id, "now": now, "limit": limit}
    if excluded:
        params["excluded"] = excluded
    with db.begin() as conn:
        found_ids = {
            row_id
            for query in (queued, retries)
            for row_id in conn.execute(query, params).scalars().all()
        }
        if not found_ids:
            return []
        rows = conn.execute(
            leasing,
            {**params, "ids": sorted(found_ids)[:limit], "owner": owner, "expires": now + lease},
        ).all()
    found = [
        LedgerRow(r.id, r.contact_id, r.email, r.attempts, r.state, r.variant, r.domain)
        for r in rows
    ]
    found.sort(key=lambda r: r.id)
    return found


def release_rows(db: Engine, row_ids: Sequence[int], owner: str) -> None:
    """Give back claimed rows that were not attempted, so other workers may take them."""
    if not row_ids:
        return
    with db.begin() as conn:
        conn.execute(
            update(messages)
            .where(
                messages.c.id.in_(list(row_ids)),
                messages.c.lease_owner == owner,
                messages.c.state.in_(("queued", "deferred")),
            )
            .values(lease_owner=None, lease_expires_at=None)
        )


def renew_leases(db: Engine, row_ids: Sequence[int], owner: str, *, until: datetime) -> set[int]:
    """Extend this owner's lease on ``row_ids``; return the ids it still holds."""
    if not row_ids:
        return set()
    with db.begin() as conn:
        conn.execute(
            update(messages)
            .where(messages.c.id.in_(list(row_ids)), messages.c.lease_owner == owner)
            .values(lease_expires_at=until)
        )
        held = conn.execute(
            select(messages.c.id).where(
                messages.c.id.in_(list(row_ids)), messages.c.lease_owner == owner
            )
        ).scalars()
        return set(held)


# -- reading the ledger ------------------------------------------------------------------------


def count_states(db: Engine, campaign_id: int) -> dict[str, int]:
    """Ledger rows per state for a campaign (every state present, zeros included).

    Safe to call while the campaign is being sent, from any process: it reads what has been
    committed, which is at most one message per connection behind the wire.
    """
    with connect_for_reading(db) as conn:
        found: dict[str, int] = {
            state: count
            for state, count in conn.execute(
                select(messages.c.state, func.count())
                .where(messages.c.campaign_id == campaign_id)
                .group_by(messages.c.state)
            )
        }
    return {state: int(found.get(state, 0)) for state in LEDGER_STATES}


def count_bounce_sample(db: Engine, campaign_id: int) -> tuple[int, int]:
    """(recipients with a final SMTP answer, hard bounces) of a campaign, for the safety stop.

    Final answers are ``sent`` and ``failed`` rows; hard bounces are the addresses this
    campaign suppressed as ``hard_bounce``.
    """
    with connect_for_reading(db) as conn:
        finals = conn.execute(
            select(func.count()).where(
                messages.c.campaign_id == campaign_id, messages.c.state.in_(("sent", "failed"))
            )
        ).scalar_one()
        bounces = conn.execute(
            select(func.count()).where(
                suppressions.c.campaign_id == campaign_id,
                suppressions.c.reason == "hard_bounce",
            )
        ).scalar_one()
    return int(finals), int(bounces)


def finish_if_done(db: Engine, campaign_id: int, *, now: datetime | None = None) -> bool:
    """Mark a ``sending`` campaign finished when no row is queued, sending or deferred."""
    with db.begin() as conn:
        pending = conn.execute(
            select(func.count()).where(
                messages.c.campaign_id == campaign_id, messages.c.state.in_(PENDING_STATES)
            )
        ).scalar_one()
        if pending:
            return False
        conn.execute(
            update(campaigns)
            .where(campaigns.c.id == campaign_id, campaigns.c.status == "sending")
            .values(status="finished", finished_at=now or utcnow())
        )
        return True


_CONTACT_FIELDS = select(contacts.c.id, contacts.c.email, contacts.c.name, contacts.c.domain).where(
    contacts.c.id.in_(bindparam("ids", expanding=True))
)
_CONTACT_ATTRIBUTES = select(
    contact_attributes.c.contact_id, contact_attributes.c.key, contact_attributes.c.value
).where(contact_attributes.c.contact_id.in_(bindparam("ids", expanding=True)))


def fetch_contact_contexts(db: Engine, contact_ids: Iterable[int]) -> dict[int, dict[str, Any]]:
    """Contact fields and attributes of the given contacts, keyed by id, for rendering."""
    ids = list(contact_ids)
    if not ids:
        return {}
    with connect_for_reading(db) as conn:
        found: dict[int, dict[str, Any]] = {
            r.id: {"id": r.id, "email": r.email, "name": r.name, "domain": r.domain}
            for r in conn.execute(_CONTACT_FIELDS, {"ids": ids})
        }
        for cid, key, value in conn.execute(_CONTACT_ATTRIBUTES, {"ids": ids}):
            found[cid].setdefault(key, value)
    return found
