"""The ledger's hot path: ``sending`` marks and SMTP outcomes, committed in groups.

A worker's outcome and its next mark are committed together (or the outcome first), and a
worker waits for its mark to be committed before its SMTP transaction starts, so a worker never
has more than one row ``sending``: after a crash, at most one ``unknown`` row per connection.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Connection, Engine, bindparam, func, insert, or_, select, update
from sqlalchemy.dialects import postgresql, sqlite

from ..storage.schema import campaigns, events, messages, suppressions, utcnow
from .ledger import DEFAULT_LEASE, LedgerRow
from .pacing import save_slowdown

__all__ = [
    "AppliedOps",
    "LedgerOp",
    "MarkSending",
    "RecordOutcome",
    "RevertSending",
    "SlowDown",
    "apply_ledger_ops",
]


# -- the hot path: marks and outcomes, committed in groups -----------------------------------


@dataclass(frozen=True)
class MarkSending:
    """Row ``row_id`` is about to be sent with ``message_id`` (only by its lease owner)."""

    row_id: int
    message_id: str


@dataclass(frozen=True)
class RecordOutcome:
    """The server's answer for one attempt (identified by its Message-ID; None for a row that
    was never attempted because its message could not be built).

    ``suppress``: a suppression reason to record for the address (hard bounces);
    ``slow_domain``: a domain (or relay key) that pushed back and is slowed down for everyone.
    """

    row: LedgerRow
    message_id: str | None
    state: str
    code: int | None
    reply: str
    next_attempt_at: datetime | None = None
    event: tuple[str, dict[str, Any]] | None = None
    suppress: str | None = None
    slow_domain: str | None = None


@dataclass(frozen=True)
class RevertSending:
    """The attempt provably never reached the server: put the row back and free its lease."""

    row_id: int
    message_id: str
    previous_state: str


@dataclass(frozen=True)
class SlowDown:
    """A domain (or the relay, ``relay_key``) pushed back: slow it down for every worker."""

    key: str
    reply: str


LedgerOp = MarkSending | RecordOutcome | RevertSending | SlowDown


@dataclass(frozen=True)
class AppliedOps:
    """What ``apply_ledger_ops`` did: one flag per op (a mark may be refused), the campaign's
    status after the commit, and when slowed-down domains may be tried again."""

    accepted: tuple[bool, ...]
    campaign_status: str | None
    slowed: dict[str, datetime]


def _insert_ignoring_duplicates(conn: Connection, table: Any, values: dict[str, Any]) -> None:
    dialect = conn.dialect.name
    if dialect == "postgresql":
        conn.execute(postgresql.insert(table).values(**values).on_conflict_do_nothing())
    elif dialect == "sqlite":
        conn.execute(sqlite.insert(table).values(**values).on_conflict_do_nothing())
    else:  # pragma: no cover - only SQLite and PostgreSQL are supported
        conn.execute(insert(table).values(**values))


# The hot path's statements are built once: constructing a Core statement costs far more
# than SQLite takes to run it, and executemany sends a whole group in one call.
_m = messages.c
# Not IN (...): an IN list is an "expanding" parameter, which executemany refuses.
_WAITING = or_(_m.state == "queued", _m.state == "deferred")
_MARK = (
    update(messages)
    .where(
        _m.id == bindparam("b_id"),
        _m.lease_owner == bindparam("b_owner"),
        _WAITING,
    )
    .values(
        state="sending",
        attempts=_m.attempts + 1,
        message_id=bindparam("b_mid"),
        lease_expires_at=bindparam("b_expires"),
        updated_at=bindparam("b_now"),
    )
)
_MARKED = select(_m.id, _m.message_id, _m.state).where(
    _m.id.in_(bindparam("b_ids", expanding=True))
)
_OUTCOME_VALUES = {
    "state": bindparam("b_state"),
    "smtp_code": bindparam("b_code"),
    "smtp_reply": bindparam("b_reply"),
    "next_attempt_at": bindparam("b_next", type_=_m.next_attempt_at.type),
    "sent_at": func.coalesce(bindparam("b_sent", type_=_m.sent_at.type), _m.sent_at),
    "lease_owner": None,
    "lease_expires_at": None,
    "updated_at": bindparam("b_now"),
}
# Only over our own attempt: if the row was recovered as unknown meanwhile, the server's
# answer is the better truth; if someone re-sent it since, their attempt is not ours.
_OUTCOME = (
    update(messages)
    .where(_m.id == bindparam("b_id"), _m.message_id == bindparam("b_mid"))
    .values(**_OUTCOME_VALUES)
)
# A row never attempted (its message could not be built): only while we hold it.
_UNSENT = (
    update(messages)
    .where(
        _m.id == bindparam("b_id"),
        _m.lease_owner == bindparam("b_owner"),
        _WAITING,
    )
    .values(**_OUTCOME_VALUES)
)
_REVERT = (
    update(messages)
    .where(_m.id == bindparam("b_id"), _m.message_id == bindparam("b_mid"), _m.state == "sending")
    .values(
        state=bindparam("b_state"),
        attempts=_m.attempts - 1,
        lease_owner=None,
        lease_expires_at=None,
        updated_at=bindparam("b_now"),
    )
)
_EVENT = insert(events)
_STATUS = select(campaigns.c.status).where(campaigns.c.id == bindparam("b_campaign"))


def apply_ledger_ops(
    db: Engine,
    campaign_id: int,
    owner: str,
    ops: Sequence[LedgerOp],
    *,
    now: datetime | None = None,
    lease: timedelta = DEFAULT_LEASE,
) -> AppliedOps:
    """Apply marks, outcomes and reverts in one transaction.

    A ``MarkSending`` is accepted only if ``owner`` still holds the row's lease and the row is
    queued or deferred; the caller must not send a row whose mark was refused. A group holds
    at most one op per row (a worker waits for its mark before it sends), so ops of one kind
    are applied together. The campaign's status is read in the same transaction, so a running
    sender notices a pause at its next commit.
    """
    now = now or utcnow()
    marks: list[dict[str, Any]] = []
    outcomes: list[dict[str, Any]] = []
    unsent: list[dict[str, Any]] = []
    reverts: list[dict[str, Any]] = []
    new_events: list[dict[str, Any]] = []
    extras: list[RecordOutcome | SlowDown] = []
    for op in ops:
        if isinstance(op, MarkSending):
            marks.append(
                {
                    "b_id": op.row_id,
                    "b_owner": owner,
                    "b_mid": op.message_id,
                    "b_expires": now + lease,
                    "b_now": now,
                }
            )
        elif isinstance(op, RevertSending):
            reverts.append(
                {
                    "b_id": op.row_id,
                    "b_mid": op.message_id,
                    "b_state": op.previous_state,
                    "b_now": now,
                }
            )
        elif isinstance(op, SlowDown):
            extras.append(op)
        else:
            values = {
                "b_id": op.row.id,
                "b_state": op.state,
                "b_code": op.code,
                "b_reply": op.reply[:2000],
                "b_next": op.next_attempt_at,
                "b_sent": now if op.state == "sent" else None,
                "b_now": now,
            }
            if op.message_id is None:
                unsent.append({**values, "b_owner": owner})
            else:
                outcomes.append({**values, "b_mid": op.message_id})
            if op.event is not None:
                kind, detail = op.event
                new_events.append(
                    {
                        "campaign_id": campaign_id,
                        "message_id": op.row.id,
                        "contact_id": op.row.contact_id,
                        "type": kind,
                        "occurred_at": now,
                        "detail": detail,
                    }
                )
            if op.suppress is not None or op.slow_domain is not None:
                extras.append(op)
    slowed: dict[str, datetime] = {}
    accepted_marks: set[int] = set()
    with db.begin() as conn:
        # Outcomes first: a worker's result and its next mark may share this commit.
        for statement, params in ((_OUTCOME, outcomes), (_UNSENT, unsent), (_REVERT, reverts)):
            if params:
                conn.execute(statement, params)
        if new_events:
            conn.execute(_EVENT, new_events)
        for extra in extras:
            _apply_extra(conn, campaign_id, extra, now, slowed)
        if marks:
            updated = conn.execute(_MARK, marks).rowcount
            wanted = {p["b_id"]: p["b_mid"] for p in marks}
            if updated == len(marks) and conn.dialect.supports_sane_multi_rowcount:
                # Each mark updates at most its own row, so every one of them took: the
                # usual case, which spares the read-back.
                accepted_marks.update(wanted)
            else:
                for row in conn.execute(_MARKED, {"b_ids": list(wanted)}):
                    if row.state == "sending" and row.message_id == wanted[row.id]:
                        accepted_marks.add(row.id)
        status = conn.execute(_STATUS, {"b_campaign": campaign_id}).scalar_one_or_none()
    accepted = tuple(
        op.row_id in accepted_marks if isinstance(op, MarkSending) else True for op in ops
    )
    return AppliedOps(accepted, status, slowed)


def _apply_extra(
    conn: Connection,
    campaign_id: int,
    op: RecordOutcome | SlowDown,
    now: datetime,
    slowed: dict[str, datetime],
) -> None:
    if isinstance(op, SlowDown):
        slowed[op.key] = save_slowdown(conn, op.key, op.reply, now)
        return
    if op.suppress is not None:
        _insert_ignoring_duplicates(
            conn,
            suppressions,
            {
                "email": op.row.email,
                "reason": op.suppress,
                "detail": op.reply[:2000],
                "campaign_id": campaign_id,
                "created_at": now,
            },
        )
    if op.slow_domain is not None:
        slowed[op.slow_domain] = save_slowdown(conn, op.slow_domain, op.reply, now)
