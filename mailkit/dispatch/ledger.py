"""The outbox ledger: claiming rows, moving them through their states, recording outcomes.

Every function here is one short transaction, so that what the database says is always what
happened: a row is ``sending`` only while an SMTP transaction for it may be in flight, and it
leaves that state only with the server's answer (or, after a crash, as ``unknown``).

Workers are identified as ``host:pid:nonce``. A lease (``lease_expires_at``) protects claimed
rows from other workers; a worker on the same host whose process is gone loses its rows at once,
a worker elsewhere when its lease runs out.
"""

from __future__ import annotations

import os
import secrets
import socket
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Engine, and_, func, insert, or_, select, update

from ..storage.schema import (
    LEDGER_STATES,
    PENDING_STATES,
    campaigns,
    contact_attributes,
    contacts,
    events,
    messages,
    utcnow,
)

__all__ = [
    "LedgerRow",
    "claim_rows",
    "count_states",
    "fetch_contact_contexts",
    "new_worker_id",
    "recover_stale_rows",
    "release_rows",
]

#: How long a claim protects rows from other workers when the owner cannot be checked.
DEFAULT_LEASE = timedelta(minutes=10)


@dataclass(frozen=True)
class LedgerRow:
    id: int
    contact_id: int
    email: str
    attempts: int


def new_worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}"


def _owner_is_dead(owner: str | None) -> bool:
    """True when ``owner`` is a worker on this host whose process no longer exists."""
    if not owner:
        return True
    host, _, rest = owner.partition(":")
    pid_text = rest.partition(":")[0]
    if host != socket.gethostname() or not pid_text.isdigit():
        return False
    pid = int(pid_text)
    if pid == os.getpid():
        return False
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
    with db.begin() as conn:
        owners = conn.execute(
            select(messages.c.lease_owner, func.max(messages.c.lease_expires_at))
            .where(messages.c.campaign_id == campaign_id, messages.c.lease_owner.is_not(None))
            .group_by(messages.c.lease_owner)
        ).all()
        dead = [o for o, expires in owners if _owner_is_dead(o) or (expires and expires < now)]
        if not dead:
            return 0
        stale = and_(messages.c.campaign_id == campaign_id, messages.c.lease_owner.in_(dead))
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


def claim_rows(
    db: Engine,
    campaign_id: int,
    worker: str,
    limit: int,
    *,
    now: datetime | None = None,
    lease: timedelta = DEFAULT_LEASE,
) -> list[LedgerRow]:
    """Lease up to ``limit`` rows that are due: queued, or deferred with a passed retry time."""
    now = now or utcnow()
    due = and_(
        messages.c.campaign_id == campaign_id,
        or_(
            messages.c.state == "queued",
            and_(messages.c.state == "deferred", messages.c.next_attempt_at <= now),
        ),
        or_(messages.c.lease_owner.is_(None), messages.c.lease_expires_at < now),
    )
    with db.begin() as conn:
        candidates = select(messages.c.id).where(due).order_by(messages.c.id).limit(limit)
        # The `due` condition is repeated on the UPDATE so that a row another worker claimed
        # between our SELECT and our UPDATE is skipped rather than stolen.
        conn.execute(
            update(messages)
            .where(messages.c.id.in_(candidates.scalar_subquery()), due)
            .values(lease_owner=worker, lease_expires_at=now + lease)
            .execution_options(synchronize_session=False)
        )
        rows = conn.execute(
            select(messages.c.id, messages.c.contact_id, messages.c.email, messages.c.attempts)
            .where(
                messages.c.campaign_id == campaign_id,
                messages.c.lease_owner == worker,
                messages.c.state.in_(("queued", "deferred")),
            )
            .order_by(messages.c.id)
        ).all()
    return [LedgerRow(r.id, r.contact_id, r.email, r.attempts) for r in rows]


def release_rows(db: Engine, row_ids: Sequence[int], worker: str) -> None:
    """Give back claimed rows that were not attempted, so other workers may take them."""
    if not row_ids:
        return
    with db.begin() as conn:
        conn.execute(
            update(messages)
            .where(
                messages.c.id.in_(list(row_ids)),
                messages.c.lease_owner == worker,
                messages.c.state.in_(("queued", "deferred")),
            )
            .values(lease_owner=None, lease_expires_at=None)
        )


def mark_sending(
    db: Engine, row_id: int, worker: str, message_id: str, *, now: datetime | None = None
) -> None:
    """Record that an SMTP transaction for this row is about to start."""
    now = now or utcnow()
    with db.begin() as conn:
        conn.execute(
            update(messages)
            .where(messages.c.id == row_id, messages.c.lease_owner == worker)
            .values(
                state="sending",
                attempts=messages.c.attempts + 1,
                message_id=message_id,
                updated_at=now,
            )
        )


def unmark_sending(db: Engine, row_id: int, worker: str, previous_state: str) -> None:
    """Undo ``mark_sending`` for a row whose transaction provably never started."""
    with db.begin() as conn:
        conn.execute(
            update(messages)
            .where(
                messages.c.id == row_id,
                messages.c.lease_owner == worker,
                messages.c.state == "sending",
            )
            .values(
                state=previous_state,
                attempts=messages.c.attempts - 1,
                lease_owner=None,
                lease_expires_at=None,
            )
        )


def record_result(
    db: Engine,
    *,
    campaign_id: int,
    row: LedgerRow,
    state: str,
    code: int | None,
    reply: str,
    event: tuple[str, dict[str, Any]] | None = None,
    next_attempt_at: datetime | None = None,
    now: datetime | None = None,
) -> None:
    """Move a row out of ``sending`` with the server's answer, and log its event, atomically."""
    now = now or utcnow()
    with db.begin() as conn:
        conn.execute(
            update(messages)
            .where(messages.c.id == row.id)
            .values(
                state=state,
                smtp_code=code,
                smtp_reply=reply[:2000],
                next_attempt_at=next_attempt_at,
                sent_at=now if state == "sent" else messages.c.sent_at,
                lease_owner=None,
                lease_expires_at=None,
                updated_at=now,
            )
        )
        if event is not None:
            kind, detail = event
            conn.execute(
                insert(events).values(
                    campaign_id=campaign_id,
                    message_id=row.id,
                    contact_id=row.contact_id,
                    type=kind,
                    occurred_at=now,
                    detail=detail,
                )
            )


def count_states(db: Engine, campaign_id: int) -> dict[str, int]:
    """Ledger rows per state for a campaign (every state present, zeros included)."""
    with db.connect() as conn:
        found: dict[str, int] = {
            state: count
            for state, count in conn.execute(
                select(messages.c.state, func.count())
                .where(messages.c.campaign_id == campaign_id)
                .group_by(messages.c.state)
            )
        }
    return {state: int(found.get(state, 0)) for state in LEDGER_STATES}


def finish_if_done(db: Engine, campaign_id: int) -> bool:
    """Mark the campaign finished when no row is queued, sending or deferred."""
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
            .values(status="finished", finished_at=utcnow())
        )
        return True


def fetch_contact_contexts(db: Engine, contact_ids: Iterable[int]) -> dict[int, dict[str, Any]]:
    """Contact fields and attributes of the given contacts, keyed by id, for rendering."""
    ids = list(contact_ids)
    if not ids:
        return {}
    with db.connect() as conn:
        found: dict[int, dict[str, Any]] = {
            r.id: {"id": r.id, "email": r.email, "name": r.name, "domain": r.domain}
            for r in conn.execute(
                select(contacts.c.id, contacts.c.email, contacts.c.name, contacts.c.domain).where(
                    contacts.c.id.in_(ids)
                )
            )
        }
        for cid, key, value in conn.execute(
            select(
                contact_attributes.c.contact_id,
                contact_attributes.c.key,
                contact_attributes.c.value,
            ).where(contact_attributes.c.contact_id.in_(ids))
        ):
            found[cid].setdefault(key, value)
    return found
