"""The ledger's hot path: ``sending`` marks and SMTP outcomes, committed in groups.

A worker's outcome and its next mark are committed together (or the outcome first), and a
worker sends its message's final dot only once its mark is committed, so a worker never has
more than one row ``sending`` and nothing the server may have delivered is unrecorded: after a
crash, at most one ``unknown`` row per connection.

The frequent statements (marks, outcomes, reverts, ``sent`` events and the status read) go to
the DBAPI connection under the group's SQLAlchemy transaction, as plain SQL with the values
bound by the columns' own SQLAlchemy types: SQLAlchemy's per-statement and per-parameter
work cost more than SQLite took to run them (a group of three marks and three outcomes with
their ``sent`` events: 530–770 µs of CPU through Core, 380–400 µs this way). The rare ones
(suppressions, slow-downs) stay in Core, in the same transaction.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from functools import lru_cache
from typing import Any

from sqlalchemy import Connection, Dialect, Engine, insert
from sqlalchemy.dialects import postgresql, sqlite

from ..storage.engine import begin_without_waiting
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


# The hot path's SQL, written with ``:name`` parameters (sqlite3's named style; psycopg's
# ``%(name)s`` is derived from it). Tables and columns are named literally, so the names are
# checked against the schema at import.
assert (messages.name, events.name, campaigns.name) == ("messages", "events", "campaigns")
# Rows a mark or an unsent outcome may touch: ours, and not attempted yet.
_HELD = "lease_owner = :b_owner AND (state = 'queued' OR state = 'deferred')"
_SET_SENDING = (
    "UPDATE messages SET state = 'sending', attempts = attempts + 1, message_id = :b_mid, "
    "lease_expires_at = :b_expires, updated_at = :b_now "
)
_MARK = _SET_SENDING + "WHERE id = :b_id AND " + _HELD
_MARKED = "SELECT id, message_id, state FROM messages WHERE id = :b_id"
_SET_OUTCOME = (
    "UPDATE messages SET state = :b_state, smtp_code = :b_code, smtp_reply = :b_reply, "
    "next_attempt_at = :b_next, sent_at = coalesce(:b_sent, sent_at), lease_owner = NULL, "
    "lease_expires_at = NULL, updated_at = :b_now "
)
# Only over our own attempt: if the row was recovered as unknown meanwhile, the server's
# answer is the better truth; if someone re-sent it since, their attempt is not ours.
_OUTCOME = _SET_OUTCOME + "WHERE id = :b_id AND message_id = :b_mid"
# A row never attempted (its message could not be built): only while we hold it.
_UNSENT = _SET_OUTCOME + "WHERE id = :b_id AND " + _HELD
_REVERT = (
    "UPDATE messages SET state = :b_state, attempts = attempts - 1, lease_owner = NULL, "
    "lease_expires_at = NULL, updated_at = :b_now "
    "WHERE id = :b_id AND message_id = :b_mid AND state = 'sending'"
)
_EVENT = (
    "INSERT INTO events (campaign_id, message_id, contact_id, type, occurred_at, detail, "
    "machine) VALUES (:campaign_id, :message_id, :contact_id, :type, :occurred_at, :detail, "
    ":machine)"
)
_STATUS = "SELECT status FROM campaigns WHERE id = :b_campaign"
_NAMED = re.compile(r":(\w+)")


@dataclass(frozen=True)
class _Driver:
    """The hot path's SQL in the driver's parameter style, and the columns' bind processors
    (SQLite stores timestamps as naive UTC text, PostgreSQL as timestamptz; JSON is text)."""

    sql: dict[str, str]
    timestamp: Callable[[datetime | None], Any]
    json: Callable[[Any], Any]


def _identity(value: Any) -> Any:
    return value


@lru_cache(maxsize=8)
def _driver_for(dialect: Dialect) -> _Driver:
    statements = {
        "mark": _MARK,
        "marked": _MARKED,
        "outcome": _OUTCOME,
        "unsent": _UNSENT,
        "revert": _REVERT,
        "event": _EVENT,
        "status": _STATUS,
    }
    # sqlite3 takes ``:name`` whatever SQLAlchemy's default style for it is.
    if dialect.driver == "psycopg":
        statements = {k: _NAMED.sub(r"%(\1)s", v) for k, v in statements.items()}
    elif dialect.driver != "pysqlite":  # pragma: no cover - SQLite and psycopg only
        raise ValueError(f"the ledger supports sqlite3 and psycopg, not {dialect.driver}")
    stamp = messages.c.updated_at.type.dialect_impl(dialect).bind_processor(dialect)
    detail = events.c.detail.type.dialect_impl(dialect).bind_processor(dialect)
    return _Driver(statements, stamp or _identity, detail or _identity)


def apply_ledger_ops(
    db: Engine,
    campaign_id: int,
    owner: str,
    ops: Sequence[LedgerOp],
    *,
    now: datetime | None = None,
    lease: timedelta = DEFAULT_LEASE,
    wait: bool = True,
) -> AppliedOps:
    """Apply marks, outcomes and reverts in one transaction.

    ``wait=False``: on SQLite, raise ``WriteLockBusy`` at once, having applied nothing, while
    another connection holds the write lock (see ``begin_without_waiting``).

    A ``MarkSending`` is accepted only if ``owner`` still holds the row's lease and the row is
    queued or deferred; the caller must not send a row whose mark was refused. A group holds
    at most one op per row (a worker waits for its mark before it records more), so ops of one kind
    are applied together. The campaign's status is read in the same transaction, so a running
    sender notices a pause at its next commit.
    """
    now = now or utcnow()
    with db.begin() if wait else begin_without_waiting(db) as conn:
        driver = _driver_for(conn.dialect)
        return _apply(conn, driver, campaign_id, owner, ops, now, lease)


def _apply(
    conn: Connection,
    driver: _Driver,
    campaign_id: int,
    owner: str,
    ops: Sequence[LedgerOp],
    now: datetime,
    lease: timedelta,
) -> AppliedOps:
    stamp = driver.timestamp
    at, expires = stamp(now), stamp(now + lease)
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
                    "b_expires": expires,
                    "b_now": at,
                }
            )
        elif isinstance(op, RevertSending):
            reverts.append(
                {
                    "b_id": op.row_id,
                    "b_mid": op.message_id,
                    "b_state": op.previous_state,
                    "b_now": at,
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
                "b_next": stamp(op.next_attempt_at),
                "b_sent": at if op.state == "sent" else None,
                "b_now": at,
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
                        "occurred_at": at,
                        "detail": driver.json(detail),
                        "machine": False,
                    }
                )
            if op.suppress is not None or op.slow_domain is not None:
                extras.append(op)
    slowed: dict[str, datetime] = {}
    accepted_marks: set[int] = set()
    sql = driver.sql
    cursor = conn.connection.driver_connection.cursor()  # type: ignore[union-attr]
    try:
        # Outcomes first: a worker's result and its next mark may share this commit.
        for name, params in (("outcome", outcomes), ("unsent", unsent), ("revert", reverts)):
            if params:
                cursor.executemany(sql[name], params)
        if new_events:
            cursor.executemany(sql["event"], new_events)
        for extra in extras:
            _apply_extra(conn, campaign_id, extra, now, slowed)
        if marks:
            cursor.executemany(sql["mark"], marks)
            wanted = {p["b_id"]: p["b_mid"] for p in marks}
            if cursor.rowcount == len(marks):
                # Each mark updates at most its own row and the drivers add up executemany's
                # counts, so every one of them took: the usual case, which spares the read-back.
                accepted_marks.update(wanted)
            else:
                for row_id, mid in wanted.items():
                    cursor.execute(sql["marked"], {"b_id": row_id})
                    row = cursor.fetchone()
                    if row is not None and row[2] == "sending" and row[1] == mid:
                        accepted_marks.add(row_id)
        cursor.execute(sql["status"], {"b_campaign": campaign_id})
        found = cursor.fetchone()
    finally:
        cursor.close()
    status: str | None = None if found is None else found[0]
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
