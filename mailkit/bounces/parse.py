"""Reading bounces and complaints: RFC 3464 DSNs, RFC 5965 ARF reports, and the rest.

``parse_bounce`` turns the raw bytes of one inbound message into facts (``ParsedBounce``):
which form it has, one ``RecipientStatus`` per reported recipient (Action, Status,
Diagnostic-Code, Final-Recipient), the addresses that may carry our VERP token, and the
Message-IDs of the returned original. It decides nothing and touches no database; what the
facts mean (hard, soft, complaint) is ``policy.py``'s business.

Forms, tried in this order:

- ``arf``          a feedback report (``message/feedback-report`` part): a complaint.
- ``dsn``          a delivery status notification (``message/delivery-status`` part).
- ``not_bounce``   an auto-reply (RFC 3834 headers, out-of-office subjects), a success
                   notification, or mail that looks like neither a bounce nor a complaint.
- ``nonstandard``  a bounce in one of the many pre-DSN forms (Exim, qmail, carriers, old
                   Exchange...): recipients from flufl.bounce, status codes read from the text.
- ``unparseable``  a bounce-looking message naming no recipient and carrying no VERP address,
                   or bytes that are not a mail message at all.

``parse_bounce`` never raises on bad input: whatever a remote server sends, the answer is a
``ParsedBounce`` (at worst ``unparseable`` with the reason).
"""

from __future__ import annotations

import email
import email.header
import email.utils
import logging
import re
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from email.message import Message
from email.parser import BytesHeaderParser, HeaderParser
from typing import Literal

from flufl.bounce import all_failures

__all__ = ["BounceForm", "ParsedBounce", "RecipientStatus", "parse_bounce"]

BounceForm = Literal["arf", "dsn", "nonstandard", "not_bounce", "unparseable"]

# flufl.bounce logs every detector it runs at INFO and a traceback for any it trips over.
logging.getLogger("flufl.bounce").setLevel(logging.CRITICAL)


@dataclass(frozen=True)
class RecipientStatus:
    """What a report says about one recipient (fields as in RFC 3464, lower-cased action)."""

    final_recipient: str | None
    original_recipient: str | None = None
    action: str | None = None  # failed | delayed | delivered | relayed | expanded
    status: str | None = None  # "5.1.1"
    diagnostic: str | None = None  # "smtp; 550 5.1.1 <x@y>: user unknown"
    remote_mta: str | None = None


@dataclass(frozen=True)
class ParsedBounce:
    """The facts of one inbound message. ``source`` says how they were read."""

    form: BounceForm
    source: str  # dsn | arf | flufl | heuristic | none
    recipients: tuple[RecipientStatus, ...] = ()
    verp_candidates: tuple[str, ...] = ()
    original_message_ids: tuple[str, ...] = ()
    original_envelope_id: str | None = None
    reporting_mta: str | None = None
    feedback_type: str | None = None
    user_agent: str | None = None
    reported_at: datetime | None = None
    subject: str | None = None
    reason: str = ""


# -- patterns ------------------------------------------------------------------------------------

_ENHANCED = re.compile(r"(?<![\d.])([45])\.(\d{1,3})\.(\d{1,3})(?![\d.])")
# A basic SMTP reply code where a transcript or a quoted reply puts one.
_BASIC = re.compile(r"(?im)(?:^[ \t>]*(?:<<<\s*)?|said:\s*|error:\s*|\(#)([45][0-5]\d)[ \-)]")
_ADDRESS = re.compile(r"[\w.!#$%&'*+/=?^`{|}~\-]+@[\w\-]+(?:\.[\w\-]+)+")
_VERP_LIKE = re.compile(r"[\w.\-]+[+=\-][a-z0-9]{1,8}\.[a-z2-7]{1,64}\.[a-z2-7]{20}@[\w.\-]+", re.I)
_MESSAGE_ID_LINE = re.compile(r"(?im)^[ \t>]*message-id:[ \t]*(<[^<>\s]+>)")
_BOUNCE_FROM = re.compile(r"mailer-daemon|postmaster|mail delivery|mail administrator", re.I)
_BOUNCE_SUBJECT = re.compile(
    r"undeliver|delivery (?:status )?notification|delivery fail|failure notice|returned mail"
    r"|mail delivery (?:failed|failure|subsystem)|non.?delivery|could not be delivered"
    r"|delivery has failed|配信エラー|配送エラー|送信エラー|配信できません|届きません",
    re.I,
)
_AUTO_SUBJECT = re.compile(
    r"out of (?:the )?office|automatic reply|auto.?reply|auto.?response|autoreply|vacation"
    r"|自動返信|自動応答|不在|休暇",
    re.I,
)
_ENVELOPE_HEADERS = ("Delivered-To", "X-Original-To", "Envelope-To", "X-Envelope-To", "To")
_CHARSETS = {"shift_jis": "cp932", "x-sjis": "cp932", "sjis": "cp932", "iso-2022-jp": "iso2022_jp"}


# -- small readers -------------------------------------------------------------------------------


def _text(value: object) -> str:
    """A header value as text, RFC 2047 words decoded; '' when it cannot be read."""
    if value is None:
        return ""
    try:
        return str(email.header.make_header(email.header.decode_header(str(value)))).strip()
    except (ValueError, LookupError, UnicodeError):
        return str(value).strip()


def _oneline(value: object) -> str:
    """A folded header value on one line (DSN fields are often folded mid-sentence)."""
    return " ".join(_text(value).split())


def _decode_part(part: Message) -> str:
    payload = part.get_payload(decode=True)
    if not isinstance(payload, bytes):
        return ""
    charset = (part.get_content_charset() or "us-ascii").lower()
    try:
        return payload.decode(_CHARSETS.get(charset, charset), errors="replace")
    except LookupError:
        return payload.decode("utf-8", errors="replace")


def _address(field: str | None) -> str | None:
    """The address of a DSN address field (``rfc822; a@b``) or a header (``Name <a@b>``)."""
    if not field:
        return None
    value = field.split(";", 1)[1] if ";" in field and "@" not in field.split(";", 1)[0] else field
    value = _text(value)
    _name, addr = email.utils.parseaddr(value)
    addr = addr or value.strip().strip("<>")
    return addr.strip() if "@" in addr else None


def _date(msg: Message) -> datetime | None:
    try:
        parsed = email.utils.parsedate_to_datetime(str(msg.get("Date", "")))
    except (TypeError, ValueError, IndexError):
        return None
    if parsed.tzinfo is None:  # "-0000": a time in UTC of unknown local zone
        parsed = parsed.replace(tzinfo=UTC)
    return parsed.astimezone(UTC)


def _text_of(msg: Message) -> str:
    """The readable text of a bounce, the returned original left out where MIME marks it."""
    if msg.get_content_type() in ("message/rfc822", "text/rfc822-headers"):
        return ""
    if not msg.is_multipart():
        return _decode_part(msg) if msg.get_content_maintype() == "text" else ""
    payload = msg.get_payload()
    parts = payload if isinstance(payload, list) else []
    return "\n".join(
        text for part in parts if isinstance(part, Message) and (text := _text_of(part))
    )


def _dedupe(items: list[str]) -> tuple[str, ...]:
    seen: set[str] = set()
    kept: list[str] = []
    for item in items:
        if item and item.lower() not in seen:
            seen.add(item.lower())
            kept.append(item)
    return tuple(kept)


# -- the returned original -----------------------------------------------------------------------


def _returned_headers(msg: Message) -> list[Message]:
    """The header blocks of returned originals (``message/rfc822``, ``text/rfc822-headers``)."""
    found: list[Message] = []
    for part in msg.walk():
        ctype = part.get_content_type()
        if ctype == "message/rfc822":
            inner = part.get_payload()
            if isinstance(inner, list) and inner and isinstance(inner[0], Message):
                found.append(inner[0])
        elif ctype == "text/rfc822-headers":
            payload = part.get_payload(decode=True)
            if isinstance(payload, bytes):
                found.append(BytesHeaderParser().parsebytes(payload))
    return found


def _original_message_ids(msg: Message, raw_text: str) -> tuple[str, ...]:
    ids = [str(h.get("Message-ID", "")).strip() for h in _returned_headers(msg)]
    own = str(msg.get("Message-ID", "")).strip().lower()
    # Non-MIME bounces quote the original inline: any Message-ID line but the bounce's own.
    ids += [m for m in _MESSAGE_ID_LINE.findall(raw_text) if m.lower() != own]
    return _dedupe([i for i in ids if i.startswith("<") and i.endswith(">")])


def _verp_candidates(
    msg: Message, envelope_rcpts: tuple[str, ...], raw_text: str
) -> tuple[str, ...]:
    """Addresses that may hold our VERP token, most trustworthy first (all are verified later)."""
    found = list(envelope_rcpts)
    for name in _ENVELOPE_HEADERS:
        found += [str(v) for v in msg.get_all(name) or []]
    for headers in _returned_headers(msg):
        found += [str(v) for v in headers.get_all("Return-Path") or []]
    # Last: anywhere in the text (a mangled body, an inline original, a relay's extra header).
    found += _VERP_LIKE.findall(raw_text)
    return _dedupe(found)


# -- the forms -----------------------------------------------------------------------------------


def _dsn_fields(part: Message) -> list[Message]:
    payload = part.get_payload()
    if isinstance(payload, list):
        return [block for block in payload if isinstance(block, Message)]
    # Some servers send the status as a single text blob; parse it block by block.
    text = payload if isinstance(payload, str) else ""
    blocks = re.split(r"\r?\n[ \t]*\r?\n", text.strip())
    return [HeaderParser().parsestr(block.strip() + "\n") for block in blocks if block.strip()]


def _read_dsn(msg: Message) -> tuple[list[RecipientStatus], str | None, str | None] | None:
    for part in msg.walk():
        if part.get_content_type() != "message/delivery-status":
            continue
        blocks = _dsn_fields(part)
        if not blocks:
            return None
        per_message, per_recipient = blocks[0], blocks[1:]
        if per_message.get("Final-Recipient") or per_message.get("Action"):
            per_recipient = blocks  # no per-message block at all (seen from some gateways)
        recipients = [
            RecipientStatus(
                final_recipient=_address(_text(b.get("Final-Recipient"))),
                original_recipient=_address(_text(b.get("Original-Recipient"))),
                action=_text(b.get("Action")).lower() or None,
                status=_status(_text(b.get("Status"))),
                diagnostic=_oneline(b.get("Diagnostic-Code"))[:1000] or None,
                remote_mta=_oneline(b.get("Remote-MTA")) or None,
            )
            for b in per_recipient
            if b.get("Final-Recipient") or b.get("Action")
        ]
        if not recipients:
            return None
        envelope_id = _text(per_message.get("Original-Envelope-Id")) or None
        reporting = _text(per_message.get("Reporting-MTA")) or None
        return recipients, envelope_id, reporting
    return None


def _status(value: str) -> str | None:
    match = re.match(r"\s*([245])\.(\d{1,3})\.(\d{1,3})", value)
    return ".".join(match.groups()) if match else None


def _read_arf(msg: Message) -> ParsedBounce | None:
    for part in msg.walk():
        if part.get_content_type() != "message/feedback-report":
            continue
        blocks = _dsn_fields(part)
        fields = blocks[0] if blocks else Message()
        rcpts = [_address(_text(v)) for v in fields.get_all("Original-Rcpt-To") or []]
        rcpts += [_address(_text(v)) for v in fields.get_all("Removal-Recipient") or []]
        originals = _returned_headers(msg)
        if not rcpts:  # the complained-about message's To: when the report names nobody
            rcpts += [_address(_text(h.get("To"))) for h in originals]
        return ParsedBounce(
            form="arf",
            source="arf",
            recipients=tuple(RecipientStatus(final_recipient=r) for r in rcpts if r),
            feedback_type=_text(fields.get("Feedback-Type")).lower() or "abuse",
            user_agent=_text(fields.get("User-Agent")) or None,
            reporting_mta=_text(fields.get("Reporting-MTA")) or None,
        )
    return None


def _auto_reply_reason(msg: Message, subject: str) -> str | None:
    auto = str(msg.get("Auto-Submitted", "")).strip().lower()
    if auto.startswith("auto-replied"):
        return "an automatic reply (Auto-Submitted: auto-replied)"
    for name in ("X-Autoreply", "X-Autorespond", "X-Auto-Response-Suppress-Reply"):
        if msg.get(name) is not None:
            return f"an automatic reply ({name})"
    if str(msg.get("Precedence", "")).strip().lower() == "auto_reply":
        return "an automatic reply (Precedence: auto_reply)"
    if _AUTO_SUBJECT.search(subject):
        return "an automatic reply (subject)"
    return None


def _codes_in(text: str) -> tuple[str | None, str | None]:
    """The first 4.x.x/5.x.x status in ``text`` (4 preferred: doubt is soft) and its line."""
    found = [(m.group(0), m.start()) for m in _ENHANCED.finditer(text)]
    if not found:
        found = [(f"{m.group(1)[0]}.0.0", m.start(1)) for m in _BASIC.finditer(text)]
    if not found:
        return None, None
    soft = [f for f in found if f[0].startswith("4")]
    code, at = (soft or found)[0]
    start, end = text.rfind("\n", 0, at) + 1, text.find("\n", at)
    line = " ".join(text[start : end if end >= 0 else None].split())
    return code, line[:1000] or None


def _read_nonstandard(
    msg: Message, text: str, looks_like_bounce: bool, sender: str
) -> tuple[str, list[RecipientStatus]] | None:
    try:
        temporary, permanent = all_failures(msg)
    except Exception:  # a detector tripping over odd input must not stop the run
        temporary, permanent = frozenset(), frozenset()
    status, line = _codes_in(text)
    if permanent or temporary:
        recipients = [
            RecipientStatus(
                final_recipient=(r.decode("utf-8", "replace") if isinstance(r, bytes) else str(r)),
                action="failed" if r in permanent else "delayed",
                status=status,
                diagnostic=line,
            )
            for r in sorted(permanent | temporary)
        ]
        return "flufl", recipients
    if not looks_like_bounce:
        return None
    return "heuristic", [
        RecipientStatus(
            final_recipient=_likely_recipient(text, line, sender),
            # Without DSN fields the only evidence of permanence is a 5.x.x code in the text.
            action="failed" if status and status.startswith("5") else None,
            status=status,
            diagnostic=line,
        )
    ]


def _likely_recipient(text: str, line: str | None, sender: str) -> str | None:
    """The address a free-text bounce is about: on the status line, else in <>, else first."""
    own = (email.utils.parseaddr(sender)[1] or "").lower()

    def usable(found: list[str]) -> list[str]:
        return [a for a in found if a.lower() != own and not _VERP_LIKE.fullmatch(a)]

    for candidates in (
        usable(_ADDRESS.findall(line or "")),
        usable(re.findall(r"<(" + _ADDRESS.pattern + r")>", text)),
        usable(_ADDRESS.findall(text)),
    ):
        if candidates:
            return candidates[0]
    return None


def parse_bounce(raw: bytes, envelope_rcpts: tuple[str, ...] = ()) -> ParsedBounce:
    """Read one inbound message into a ``ParsedBounce``; never raises on bad input.

    ``envelope_rcpts`` are the SMTP envelope recipients when the message arrived over SMTP:
    the most reliable place for the VERP address.
    """
    try:
        return _parse(raw, envelope_rcpts)
    except Exception as exc:  # the promise: one bad message never crashes a run
        return ParsedBounce(
            form="unparseable", source="none", reason=f"parser error: {type(exc).__name__}"
        )


def _parse(raw: bytes, envelope_rcpts: tuple[str, ...]) -> ParsedBounce:
    if not raw.strip():
        return ParsedBounce(form="unparseable", source="none", reason="empty message")
    msg = email.message_from_bytes(raw)
    if not msg.keys():
        return ParsedBounce(form="unparseable", source="none", reason="no mail headers")
    raw_text = raw.decode("utf-8", errors="replace")
    subject = _text(msg.get("Subject"))
    base = ParsedBounce(
        form="not_bounce",
        source="none",
        verp_candidates=_verp_candidates(msg, envelope_rcpts, raw_text),
        original_message_ids=_original_message_ids(msg, raw_text),
        reported_at=_date(msg),
        subject=subject or None,
    )
    arf = _read_arf(msg)
    if arf is not None:
        return replace(
            base,
            form="arf",
            source="arf",
            recipients=arf.recipients,
            feedback_type=arf.feedback_type,
            user_agent=arf.user_agent,
            reporting_mta=arf.reporting_mta,
        )

    dsn = _read_dsn(msg)
    if dsn is not None:
        recipients, envelope_id, reporting = dsn
        if all(r.action in ("delivered", "relayed", "expanded") for r in recipients):
            return replace(base, source="dsn", reason="a success notification")
        return replace(
            base,
            form="dsn",
            source="dsn",
            recipients=tuple(recipients),
            original_envelope_id=envelope_id,
            reporting_mta=reporting,
        )

    sender = _text(msg.get("From"))
    looks_like_bounce = bool(
        _BOUNCE_FROM.search(sender)
        or _BOUNCE_SUBJECT.search(subject)
        or msg.get_content_type() == "multipart/report"
    )
    if not looks_like_bounce:
        auto = _auto_reply_reason(msg, subject)
        if auto is not None:
            return replace(base, reason=auto)
    # A multipart whose boundaries were mangled may yield no text part: read the raw text.
    text = _text_of(msg) or raw_text
    found = _read_nonstandard(msg, text, looks_like_bounce, sender)
    if found is None:
        return replace(base, reason="neither a bounce nor a complaint")
    source, recipients = found
    has_verp = any(_VERP_LIKE.search(c) for c in base.verp_candidates)
    if not any(r.final_recipient for r in recipients) and not has_verp:
        return replace(
            base,
            form="unparseable",
            source=source,
            reason="a bounce that names no recipient and carries no VERP address",
        )
    return replace(base, form="nonstandard", source=source, recipients=tuple(recipients))
