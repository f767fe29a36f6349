"""What a bounce or complaint means, which ledger row it is about, and what to do about it.

The rules (every decision is written as an event whose ``detail`` says why):

======================================  ===========  ========================================
report                                  event type   suppression (``suppressions.reason``)
======================================  ===========  ========================================
``Action: failed`` + ``Status: 5.x.x``  bounce       at once (``hard_bounce``)
``Status: 4.x.x`` (also when failed)    soft_bounce  after ``soft_limit`` distinct messages to
``Action: delayed``                     soft_bounce  the address soft-bounced within
no readable status at all               soft_bounce  ``soft_window`` (3 in 30 days: ``soft_bounce``)
ARF feedback report                     complaint    at once (``complaint``)
``delivered`` / ``relayed`` DSN         (none)       never
======================================  ===========  ========================================

Doubt is soft: a 5.x.x Status whose Diagnostic-Code carries a 4xx reply, or a free-text bounce
with no 5.x.x code, is a soft bounce; only clear evidence suppresses at once.

A report is tied to its ledger row (``messages.id``) in this order, and the event records which
way was used (``detail.matched_by``): ``verp`` (the signed token in the bounce address, which
works even when the report itself is mangled), ``message_id`` (the returned original's
Message-ID header), ``recipient`` (Final-Recipient / Original-Rcpt-To, the most recent message
actually sent to that address). A report that matches no row changes nothing.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Literal

from sqlalchemy import Connection, distinct, func, insert, select
from sqlalchemy.exc import IntegrityError

from ..contacts import normalize_email
from ..storage.schema import contacts, events, messages, suppressions, utcnow
from ..tracking.tokens import Keyring
from .parse import ParsedBounce, RecipientStatus
from .verp import decode_verp

__all__ = [
    "BounceDecision",
    "BounceKind",
    "BouncePolicy",
    "LedgerMatch",
    "apply_decisions",
    "classify_status",
    "decide_bounce",
]

BounceKind = Literal["hard", "soft"]
DecisionKind = Literal["hard", "soft", "complaint", "unmatched"]
MatchedBy = Literal["verp", "message_id", "recipient"]

_EVENT_TYPES = {"hard": "bounce", "soft": "soft_bounce", "complaint": "complaint"}
_SMTP_CODE = re.compile(r"(?<![\d.])([245])(?:\d\d|\.\d{1,3}\.\d{1,3})(?![\d.])")


@dataclass(frozen=True)
class BouncePolicy:
    """How many soft bounces (``soft_limit`` distinct messages within ``soft_window``) suppress."""

    soft_limit: int = 3
    soft_window: timedelta = timedelta(days=30)

    def __post_init__(self) -> None:
        if self.soft_limit < 1:
            raise ValueError(f"soft_limit must be at least 1, not {self.soft_limit}")
        if self.soft_window <= timedelta(0):
            raise ValueError("soft_window must be a positive duration")


@dataclass(frozen=True)
class LedgerMatch:
    """The ledger row a report is about, and how it was found."""

    message_row_id: int
    campaign_id: int
    contact_id: int
    email: str
    sent_at: datetime | None
    matched_by: MatchedBy


@dataclass(frozen=True)
class BounceDecision:
    """One decision about one recipient of one report."""

    kind: DecisionKind
    recipient: RecipientStatus
    match: LedgerMatch | None
    reason: str


def classify_status(
    action: str | None, status: str | None, diagnostic: str | None = None
) -> BounceKind | None:
    """Hard or soft for one recipient's DSN fields; None when it is not a failure at all.

    ``failed`` + 5.x.x is hard; 4.x.x or ``delayed`` is soft, never hard; a report with no
    readable status is soft; a 5.x.x whose diagnostic reply is 4xx is soft (doubt is soft).
    """
    action = (action or "").strip().lower()
    if action in ("delivered", "relayed", "expanded"):
        return None
    if action == "delayed":
        return "soft"
    code_class = status[0] if status else None
    diagnostic_class = None
    if diagnostic:
        found = _SMTP_CODE.search(diagnostic)
        diagnostic_class = found.group(1) if found else None
    if code_class is None:
        code_class = diagnostic_class
    if code_class == "5" and action in ("failed", "") and diagnostic_class != "4":
        return "hard"
    return "soft"


# -- matching ------------------------------------------------------------------------------------


def _row_match(conn: Connection, where: Any, matched_by: MatchedBy) -> LedgerMatch | None:
    m = messages.c
    row = conn.execute(
        select(m.id, m.campaign_id, m.contact_id, m.email, m.sent_at)
        .where(where)
        .order_by(m.sent_at.desc(), m.id.desc())
        .limit(1)
    ).first()
    if row is None:
        return None
    return LedgerMatch(row.id, row.campaign_id, row.contact_id, row.email, row.sent_at, matched_by)


def _by_verp(conn: Connection, parsed: ParsedBounce, keyring: Keyring | None) -> LedgerMatch | None:
    if keyring is None:
        return None
    for candidate in parsed.verp_candidates:
        row_id = decode_verp(candidate, keyring)
        if row_id is not None:
            found = _row_match(conn, messages.c.id == row_id, "verp")
            if found is not None:
                return found
    return None


def _same_address(a: str | None, b: str | None) -> bool:
    return bool(a and b and a.strip().lower() == b.strip().lower())


def _by_message_id(
    conn: Connection, parsed: ParsedBounce, rcpt: RecipientStatus, only_one: bool
) -> LedgerMatch | None:
    for mid in parsed.original_message_ids:
        found = _row_match(conn, messages.c.message_id == mid, "message_id")
        # One Message-ID per ledger row: in a report about several recipients it only
        # belongs to the block that names that row's address.
        if found is not None and (
            only_one
            or _same_address(found.email, rcpt.final_recipient)
            or _same_address(found.email, rcpt.original_recipient)
        ):
            return found
    return None


def _by_recipient(conn: Connection, rcpt: RecipientStatus) -> LedgerMatch | None:
    for address in (rcpt.original_recipient, rcpt.final_recipient):
        if not address:
            continue
        try:
            exact = normalize_email(address)
        except ValueError:
            exact = address.strip()
        # Through the contact: its address is unique and indexed, and is the one its ledger
        # rows were sent to (a contact's address never changes).
        sent = messages.c.sent_at.is_not(None)
        contact = select(contacts.c.id).where(contacts.c.email == exact).scalar_subquery()
        found = _row_match(conn, (messages.c.contact_id == contact) & sent, "recipient")
        if found is None:  # servers fold the local part's case; mailboxes rarely care
            folded = select(contacts.c.id).where(func.lower(contacts.c.email) == exact.lower())
            found = _row_match(conn, messages.c.contact_id.in_(folded) & sent, "recipient")
        if found is not None:
            return found
    return None


# -- deciding ------------------------------------------------------------------------------------


def _describe(rcpt: RecipientStatus, kind: str) -> str:
    facts = ", ".join(
        f"{name}: {value}"
        for name, value in (("Action", rcpt.action), ("Status", rcpt.status))
        if value
    )
    return f"{facts or 'no status given'} → {kind} bounce"


def decide_bounce(
    conn: Connection, parsed: ParsedBounce, *, keyring: Keyring | None
) -> list[BounceDecision]:
    """The decisions a parsed report calls for (reads the ledger, writes nothing)."""
    verp = _by_verp(conn, parsed, keyring)
    if parsed.form == "arf":
        rcpts = parsed.recipients or (RecipientStatus(final_recipient=None),)
        reason = f"feedback report ({parsed.feedback_type or 'abuse'}) → complaint"
        match = verp or _by_message_id(conn, parsed, rcpts[0], only_one=True)
        for rcpt in rcpts:
            match = match or _by_recipient(conn, rcpt)
        return [BounceDecision("complaint" if match else "unmatched", rcpts[0], match, reason)]
    if parsed.form not in ("dsn", "nonstandard"):
        return []
    failures = [
        (rcpt, kind)
        for rcpt in parsed.recipients
        if (kind := classify_status(rcpt.action, rcpt.status, rcpt.diagnostic)) is not None
    ]
    if not failures:
        return []
    if verp is not None:
        # The token names one message to one address: the report is about that message,
        # whichever address a forwarder finally failed on. The worst block decides.
        rcpt, kind = next(((r, k) for r, k in failures if k == "hard"), failures[0])
        return [BounceDecision(kind, rcpt, verp, _describe(rcpt, kind))]
    decisions = []
    for rcpt, kind in failures:
        match = _by_message_id(conn, parsed, rcpt, only_one=len(failures) == 1)
        match = match or _by_recipient(conn, rcpt)
        decisions.append(
            BounceDecision(kind if match else "unmatched", rcpt, match, _describe(rcpt, kind))
        )
    return decisions


# -- acting --------------------------------------------------------------------------------------


def _suppress(
    conn: Connection, email: str, reason: str, detail: str, campaign_id: int, when: datetime
) -> str | None:
    """Suppress ``email`` inside the caller's transaction: None if new, else the old reason."""
    try:
        address = normalize_email(email)
    except ValueError:
        address = email.strip()
    s = suppressions.c
    existing = conn.execute(select(s.reason).where(s.email == address)).scalar_one_or_none()
    if existing is not None:
        return str(existing)
    try:
        with conn.begin_nested():  # a concurrent writer may win: keep our transaction alive
            conn.execute(
                insert(suppressions).values(
                    email=address,
                    reason=reason,
                    detail=detail[:1000],
                    campaign_id=campaign_id,
                    created_at=when,
                )
            )
    except IntegrityError:
        return reason
    return None


def _soft_count(conn: Connection, match: LedgerMatch, since: datetime) -> int:
    """Distinct messages to the address (its contact) that soft-bounced since ``since``, this
    one included."""
    e, m = events.c, messages.c
    earlier = conn.execute(
        select(func.count(distinct(e.message_id)))
        .select_from(events.join(messages, messages.c.id == e.message_id))
        .where(
            e.type == "soft_bounce",
            m.contact_id == match.contact_id,
            e.occurred_at >= since,
            e.message_id != match.message_row_id,
        )
    ).scalar_one()
    return int(earlier) + 1


def _span(window: timedelta) -> str:
    days, seconds = window.days, window.seconds
    if seconds == 0:
        return f"{days} day{'s' if days != 1 else ''}"
    return f"{window.total_seconds() / 3600:g} hours"


def _when(parsed: ParsedBounce, match: LedgerMatch, now: datetime) -> datetime:
    """When it happened: the report's Date, but never before the send nor in the future."""
    when = parsed.reported_at or now
    if match.sent_at is not None and when < match.sent_at:
        when = match.sent_at
    return min(when, now)


def apply_decisions(
    conn: Connection,
    parsed: ParsedBounce,
    decisions: list[BounceDecision],
    *,
    policy: BouncePolicy,
    now: datetime | None = None,
) -> int:
    """Write the events and suppressions of ``decisions``; returns how many addresses it suppressed.

    Runs in the caller's transaction, so a report is recorded whole or not at all.
    """
    now = now or utcnow()
    suppressed = 0
    for decision in decisions:
        match = decision.match
        if match is None or decision.kind == "unmatched":
            continue
        rcpt, when = decision.recipient, _when(parsed, match, now)
        detail: dict[str, Any] = {
            "kind": decision.kind,
            "source": parsed.source,
            "matched_by": match.matched_by,
            "final_recipient": rcpt.final_recipient,
        }
        if decision.kind == "complaint":
            detail |= {"feedback_type": parsed.feedback_type, "user_agent": parsed.user_agent}
        else:
            detail |= {
                "status": rcpt.status,
                "action": rcpt.action,
                "diagnostic": rcpt.diagnostic,
                "remote_mta": rcpt.remote_mta,
            }
        if parsed.reporting_mta:
            detail["reporting_mta"] = parsed.reporting_mta
        if parsed.original_envelope_id:
            detail["original_envelope_id"] = parsed.original_envelope_id
        reason, suppress_as = decision.reason, None
        if decision.kind == "hard":
            reason, suppress_as = f"{reason}: suppress at once", "hard_bounce"
        elif decision.kind == "complaint":
            reason, suppress_as = f"{reason}: suppress at once", "complaint"
        else:
            count = _soft_count(conn, match, when - policy.soft_window)
            window = _span(policy.soft_window)
            detail["soft_count"] = count
            if count >= policy.soft_limit:
                reason = f"{reason} {count} of {policy.soft_limit} within {window}: suppress"
                suppress_as = "soft_bounce"
            else:
                reason = f"{reason} {count} of {policy.soft_limit} within {window}: keep"
        outcome = "kept"
        if suppress_as is not None:
            why = f"{reason} ({parsed.source}, matched by {match.matched_by})"
            before = _suppress(conn, match.email, suppress_as, why, match.campaign_id, when)
            outcome = "suppressed" if before is None else f"already suppressed ({before})"
        detail |= {"reason": reason, "decision": outcome}
        common = {
            "campaign_id": match.campaign_id,
            "message_id": match.message_row_id,
            "contact_id": match.contact_id,
            "occurred_at": when,
        }
        conn.execute(
            insert(events).values(type=_EVENT_TYPES[decision.kind], detail=detail, **common)
        )
        if outcome == "suppressed":
            suppressed += 1
            conn.execute(
                insert(events).values(
                    type="suppressed",
                    detail={"reason": suppress_as, "because": reason, "source": "bounces"},
                    **common,
                )
            )
    return suppressed
