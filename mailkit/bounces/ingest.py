"""Ingesting bounces: every source through the parser and the policy, once per message.

Each inbound message is recorded in one transaction: a row in ``inbound_bounces`` keyed by the
SHA-256 of its (line-ending normalised) bytes, the events and suppressions its report calls
for, and, when nothing could be done with it, a copy in ``bounce_rejects``. Ingesting the same
message again finds its hash and changes nothing, so re-running over a whole mbox or Maildir is
safe. A message that cannot be parsed never stops the run and never suppresses anyone.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import asdict, dataclass, fields
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, Engine, func, insert, select
from sqlalchemy.exc import IntegrityError, OperationalError

from ..errors import StorageError
from ..storage import connect_for_reading
from ..storage.schema import bounce_rejects, inbound_bounces, utcnow
from ..tracking.tokens import Keyring, load_keyring
from .parse import ParsedBounce, parse_bounce
from .policy import BounceDecision, BouncePolicy, apply_decisions, decide_bounce
from .sources import BounceSource, InboundMessage, open_source

__all__ = [
    "BounceReject",
    "IngestReport",
    "count_bounce_rejects",
    "ingest_bounces",
    "ingest_message",
    "load_bounce_rejects",
]

#: Rejected messages are kept up to this size (a bounce may carry a large original back).
MAX_REJECT_BYTES = 5 * 1024 * 1024


@dataclass(frozen=True)
class IngestReport:
    """What an ingest run did.

    - ``seen``        inbound messages looked at (duplicates included).
    - ``duplicates``  messages ingested before (same bytes): skipped, nothing changed.
    - ``hard``        hard bounces recorded (``bounce`` events), one per recipient decided.
    - ``soft``        soft bounces recorded (``soft_bounce`` events).
    - ``complaints``  complaints recorded (``complaint`` events).
    - ``unmatched``   reports about no message in the ledger: kept aside, nothing changed.
    - ``ignored``     messages that are not bounces (auto-replies, success notices): kept aside.
    - ``rejected``    messages that could not be parsed or read: kept aside.
    - ``suppressed``  addresses newly put on the suppression list by this run.
    """

    seen: int = 0
    duplicates: int = 0
    hard: int = 0
    soft: int = 0
    complaints: int = 0
    unmatched: int = 0
    ignored: int = 0
    rejected: int = 0
    suppressed: int = 0

    def __add__(self, other: IngestReport) -> IngestReport:
        return IngestReport(
            **{f.name: getattr(self, f.name) + getattr(other, f.name) for f in fields(self)}
        )

    def to_dict(self) -> dict[str, int]:
        return asdict(self)


@dataclass(frozen=True)
class BounceReject:
    """A message kept aside: unparseable, unmatched, or not a bounce at all."""

    id: int
    source: str
    reason: str
    received_at: datetime
    size: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _outcome(parsed: ParsedBounce, decisions: list[BounceDecision]) -> tuple[str, str | None]:
    """The message's outcome and, when it is kept aside, why."""
    if parsed.form == "unparseable":
        return "rejected", f"unparseable: {parsed.reason}"
    if parsed.form == "not_bounce":
        return "ignored", f"not a bounce: {parsed.reason}"
    if not decisions:
        return "ignored", "not a bounce: a report with no failed recipient"
    kinds = {d.kind for d in decisions}
    for kind in ("complaint", "hard", "soft"):
        if kind in kinds:
            return kind, None
    names = ", ".join(sorted({d.recipient.final_recipient or "?" for d in decisions}))
    what = "complaint" if parsed.form == "arf" else "bounce"
    return "unmatched", f"unmatched: a {what} about {names}, which no sent message matches"


def _record(
    conn: Connection,
    message: InboundMessage,
    keyring: Keyring | None,
    policy: BouncePolicy,
    now: datetime,
) -> IngestReport:
    digest = message.digest
    known = select(inbound_bounces.c.id).where(inbound_bounces.c.sha256 == digest)
    if conn.execute(known).first() is not None:
        return IngestReport(seen=1, duplicates=1)
    if message.error is not None:
        parsed = ParsedBounce(form="unparseable", source="none", reason=message.error)
    else:
        parsed = parse_bounce(message.raw, message.envelope_rcpts)
    decisions = decide_bounce(conn, parsed, keyring=keyring)
    outcome, reject_reason = _outcome(parsed, decisions)
    first = next((d.match for d in decisions if d.match is not None), None)
    # The hash row first: a concurrent ingest of the same message fails here, before any effect.
    conn.execute(
        insert(inbound_bounces).values(
            sha256=digest,
            source=message.source[:2000],
            outcome=outcome,
            message_id=first.message_row_id if first else None,
            matched_by=first.matched_by if first else None,
            received_at=now,
        )
    )
    suppressed = apply_decisions(conn, parsed, decisions, policy=policy, now=now)
    if reject_reason is not None:
        conn.execute(
            insert(bounce_rejects).values(
                source=message.source[:2000],
                reason=reject_reason[:2000],
                raw=message.raw[:MAX_REJECT_BYTES],
                received_at=now,
            )
        )
    counts = {"hard": 0, "soft": 0, "complaint": 0, "unmatched": 0}
    for decision in decisions:
        counts[decision.kind] += 1
    return IngestReport(
        seen=1,
        hard=counts["hard"],
        soft=counts["soft"],
        complaints=counts["complaint"],
        unmatched=1 if outcome == "unmatched" else 0,
        ignored=1 if outcome == "ignored" else 0,
        rejected=1 if outcome == "rejected" else 0,
        suppressed=suppressed,
    )


def ingest_message(
    db: Engine,
    message: InboundMessage,
    *,
    keyring: Keyring | None,
    policy: BouncePolicy | None = None,
) -> IngestReport:
    """Parse, match, decide and record one inbound message, in one transaction."""
    policy = policy or BouncePolicy()
    try:
        with db.begin() as conn:
            return _record(conn, message, keyring, policy, utcnow())
    except IntegrityError:
        # Another process recorded the same message between our check and our insert.
        with connect_for_reading(db) as conn:
            known = select(inbound_bounces.c.id).where(inbound_bounces.c.sha256 == message.digest)
            if conn.execute(known).first() is not None:
                return IngestReport(seen=1, duplicates=1)
        raise
    except OperationalError as exc:
        raise StorageError(f"cannot record a bounce in {db.url!r}: {exc.orig}") from exc


def _keyring_for(db: Engine) -> Keyring:
    return load_keyring(db.url.render_as_string(hide_password=False))


def ingest_bounces(
    db: Engine,
    paths_or_source: str
    | os.PathLike[str]
    | BounceSource
    | Iterable[str | os.PathLike[str] | BounceSource],
    *,
    keyring: Keyring | None = None,
    policy: BouncePolicy | None = None,
) -> IngestReport:
    """Ingest every message of one or more sources (paths, ``imaps://`` URLs, ``BounceSource``).

    Hard bounces and complaints suppress their address at once; soft bounces after
    ``policy.soft_limit`` within ``policy.soft_window``; messages that cannot be used are kept
    in ``bounce_rejects``. Idempotent: a message seen before is counted as a duplicate only.
    ``keyring`` (to verify VERP addresses) defaults to the workspace's (``load_keyring``).
    """
    if isinstance(paths_or_source, (str, os.PathLike, BounceSource)):
        specs: list[str | os.PathLike[str] | BounceSource] = [paths_or_source]
    else:
        specs = list(paths_or_source)
    keyring = keyring if keyring is not None else _keyring_for(db)
    policy = policy or BouncePolicy()
    sources = [open_source(spec) for spec in specs]  # every path checked before any work
    report = IngestReport()
    for source in sources:
        with source:
            for message in source.fetch_messages():
                report += ingest_message(db, message, keyring=keyring, policy=policy)
                source.mark_done(message)
    return report


def load_bounce_rejects(db: Engine, *, limit: int | None = None) -> list[BounceReject]:
    """Messages kept aside, newest first (``limit``: at most that many)."""
    r = bounce_rejects.c
    query = select(r.id, r.source, r.reason, r.received_at, func.length(r.raw).label("size"))
    query = query.order_by(r.received_at.desc(), r.id.desc())
    if limit is not None:
        query = query.limit(limit)
    with connect_for_reading(db) as conn:
        return [
            BounceReject(row.id, row.source, row.reason, row.received_at, int(row.size or 0))
            for row in conn.execute(query)
        ]


def count_bounce_rejects(db: Engine) -> int:
    """How many messages are kept aside in ``bounce_rejects``."""
    with connect_for_reading(db) as conn:
        return int(conn.execute(select(func.count()).select_from(bounce_rejects)).scalar_one())
