"""One MIME message per recipient, built from a rendered template (pure: no I/O).

Each message is ``multipart/alternative`` (plain text, then HTML), UTF-8, addressed to exactly
one recipient: no Cc, no Bcc, no other address in To. Non-ASCII display names and subjects
are RFC 2047 encoded by ``email.policy.SMTP``; long ASCII header values of our own (a
``List-Unsubscribe`` URL, say) are folded at spaces and never encoded, because receivers
read them literally. Every header value is checked for CR/LF, so data can never add headers.
"""

from __future__ import annotations

import base64
import binascii
import functools
import random
import re
import secrets
import time
from collections.abc import Mapping
from datetime import datetime
from email import policy as email_policy
from email.headerregistry import (
    Address,
    BaseHeader,
    HeaderRegistry,
    UniqueAddressHeader,
    UnstructuredHeader,
)
from email.message import EmailMessage
from email.policy import Policy
from email.utils import format_datetime
from typing import Any, Final, cast

from .errors import AddressError
from .storage.schema import utcnow
from .templates import RenderedMessage

__all__ = [
    "MessageSkeleton",
    "build_message",
    "build_skeleton",
    "make_message_id",
    "message_to_bytes",
    "parse_address",
]

_MAX_LINE: Final = 78  # RFC 5322 2.1.1: SHOULD; 998 is the MUST
_HARD_LIMIT: Final = 998
# Headers build_message owns; a caller's ``headers`` may not replace them (a Bcc or a second
# To would break the one-recipient guarantee).
_OWN_HEADERS: Final = frozenset(
    [
        "from",
        "to",
        "cc",
        "bcc",
        "subject",
        "date",
        "message-id",
        "reply-to",
        "sender",
        "mime-version",
        "content-type",
        "content-transfer-encoding",
        "resent-to",
        "resent-cc",
        "resent-bcc",
    ]
)


def _wrap(line: str) -> list[str]:
    """Fold one physical header line before spaces so that it fits in 78 columns if it can.

    Unfolding only removes CRLF before whitespace, so folding at any existing space is
    invisible to a reader, whatever the header's syntax.
    """
    lines = []
    # Never fold between the field name and its value.
    lo = 1 if line.startswith((" ", "\t")) else line.find(": ") + 2
    while len(line) > _MAX_LINE:
        cut = line.rfind(" ", lo, _MAX_LINE + 1)
        if cut <= 0 or not line[:cut].strip():
            cut = line.find(" ", max(lo, _MAX_LINE + 1))  # one long word: fold after it
            if cut == -1:
                break
        lines.append(line[:cut])
        line = line[cut:]
        lo = 1
    lines.append(line)
    if any(len(part) > _HARD_LIMIT for part in lines):
        raise AddressError(f"header line {line[:40]!r}... has a word over {_HARD_LIMIT} bytes")
    return lines


def _rewrap(folded: str, linesep: str) -> str:
    lines = folded.removesuffix(linesep).split(linesep)
    return linesep.join(part for line in lines for part in _wrap(line)) + linesep


# HeaderRegistry mixes BaseHeader into these classes; BaseHeader.fold is the stdlib's folding.
class _LiteralAsciiHeader(UnstructuredHeader):
    """An unstructured header that, when ASCII, is folded at spaces but never RFC 2047 encoded."""

    def fold(self, *, policy: Policy) -> str:
        header = cast(BaseHeader, self)
        if not header.isascii():
            return BaseHeader.fold(header, policy=policy)
        return policy.linesep.join(_wrap(f"{header.name}: {header}")) + policy.linesep


class _AddressHeader(UniqueAddressHeader):
    """The stdlib address header, with its occasional 79+ column line folded once more."""

    def fold(self, *, policy: Policy) -> str:
        folded = BaseHeader.fold(cast(BaseHeader, self), policy=policy)
        return _rewrap(folded, policy.linesep)


class _HeaderRegistry(HeaderRegistry):
    """Our header classes; and each class built once (the stdlib builds one per lookup)."""

    def __init__(self) -> None:
        super().__init__(default_class=_LiteralAsciiHeader)
        for name in ("from", "to", "reply-to"):
            self.map_to_type(name, cast("type[BaseHeader]", _AddressHeader))
        self._built: dict[str, type[BaseHeader]] = {}

    def __getitem__(self, name: str) -> type[BaseHeader]:
        key = name.lower()
        cls = self._built.get(key)
        if cls is None:
            cls = self._built[key] = super().__getitem__(key)
        return cls


_POLICY: Final = email_policy.SMTP.clone(header_factory=_HeaderRegistry())


def _check_line(what: str, value: str) -> None:
    if "\r" in value or "\n" in value or "\x00" in value:
        raise AddressError(
            f"{what} contains a line break or NUL ({value!r}): header values must be one line; "
            "this is how header injection works, so it is refused"
        )


def parse_address(value: str, *, what: str = "address") -> Address:
    """Parse ``"山田 <a@example.jp>"`` or ``"a@example.jp"`` into one Address.

    The domain is IDNA-encoded; a non-ASCII local part, a group, several addresses or
    anything malformed raise AddressError naming ``what``.
    """
    _check_line(what, value)
    try:
        header: Any = _POLICY.header_factory("from", value)
        addresses = header.addresses
        defects = header.defects
    except Exception as exc:  # the stdlib parser raises IndexError and others on garbage
        raise AddressError(f"{what} {value!r} is not an email address: {exc}") from None
    if len(addresses) == 1 and not addresses[0].username.isascii():
        raise AddressError(
            f"{what} {value!r} has a non-ASCII local part; SMTPUTF8 addresses are not supported"
        )
    if len(addresses) != 1 or defects:
        problem = "; ".join(str(d) for d in defects) or f"{len(addresses)} addresses"
        raise AddressError(
            f"{what} {value!r} must be one address like 'a@example.jp' or "
            f"'山田 <a@example.jp>' ({problem})"
        )
    address: Address = addresses[0]
    if not address.username or not address.domain:
        raise AddressError(f"{what} {value!r} needs a local part and a domain")
    domain = address.domain
    if not domain.isascii():
        try:
            domain = domain.encode("idna").decode("ascii")
        except UnicodeError as exc:
            raise AddressError(f"{what} {value!r} has an invalid domain: {exc}") from None
        address = Address(address.display_name, address.username, domain)
    return address


def make_message_id(domain: str) -> str:
    """A new globally unique Message-ID, ``<time.random@domain>``."""
    domain = domain.strip().strip("<>").rpartition("@")[2] or "localhost"
    _check_line("Message-ID domain", domain)
    if not domain.isascii():
        domain = domain.encode("idna").decode("ascii")
    # Unique, not secret (nothing is authorised by it): the random module's generator, seeded
    # from the OS and reseeded in every forked child, spares a system call per message.
    return f"<{int(time.time())}.{random.getrandbits(96):024x}@{domain}>"


def _transfer_encoding(body: str) -> str:
    if body.isascii() and max(map(len, body.splitlines()), default=0) <= _HARD_LIMIT:
        return "7bit"
    # Quoted-printable triples every non-ASCII byte and base64 costs a third on all of them:
    # QP is shorter while under about a sixth of the UTF-8 bytes are non-ASCII.
    utf8_len = len(body.encode("utf-8"))
    non_ascii = utf8_len - len(body.encode("ascii", "ignore"))
    return "quoted-printable" if non_ascii * 6 < utf8_len else "base64"


def build_message(
    rendered: RenderedMessage,
    *,
    from_addr: str,
    to_addr: str,
    to_name: str | None = None,
    reply_to: str | None = None,
    message_id: str | None = None,
    date: datetime | None = None,
    headers: Mapping[str, str] | None = None,
) -> EmailMessage:
    """The message for one recipient: text and HTML alternatives, addressed to ``to_addr`` only.

    ``from_addr``/``reply_to`` may carry a display name (``"山田 <a@example.jp>"``).
    ``to_name`` comes from contact data, so its whitespace (an Excel cell's line breaks) is
    collapsed rather than refused. ``headers`` adds headers such as ``List-Unsubscribe``;
    it may not set the addressing, subject or MIME headers. Raises AddressError for bad
    addresses and for any CR/LF in a header value.
    """
    sender = parse_address(from_addr, what="From")
    recipient = parse_address(to_addr, what="To")
    if to_name is not None:
        recipient = Address(" ".join(to_name.split()), recipient.username, recipient.domain)
    _check_line("Subject", rendered.subject)
    if date is not None and date.tzinfo is None:
        raise ValueError(f"naive date {date!r}: pass a timezone-aware datetime")
    if message_id is None:
        message_id = make_message_id(sender.domain)
    else:
        _check_line("Message-ID", message_id)
        message_id = message_id.strip()
        if not message_id.startswith("<"):
            message_id = f"<{message_id}>"
        if "@" not in message_id or not message_id.endswith(">") or " " in message_id:
            raise AddressError(f"Message-ID {message_id!r} must look like <unique@domain>")

    msg = EmailMessage(policy=_POLICY)
    msg["From"] = sender
    msg["To"] = recipient
    msg["Subject"] = rendered.subject
    msg["Date"] = format_datetime(date or utcnow())
    msg["Message-ID"] = message_id
    if reply_to:
        msg["Reply-To"] = parse_address(reply_to, what="Reply-To")
    for name, value in (headers or {}).items():
        if not name or not name.isascii() or not all(33 <= ord(c) <= 126 for c in name):
            raise AddressError(f"header name {name!r} is not a valid field name")
        if ":" in name or name.lower() in _OWN_HEADERS:
            raise AddressError(f"header {name!r} is set by build_message and cannot be passed in")
        _check_line(f"header {name}", value)
        msg[name] = value
    msg.set_content(
        rendered.text, subtype="plain", charset="utf-8", cte=_transfer_encoding(rendered.text)
    )
    msg.add_alternative(
        rendered.html, subtype="html", charset="utf-8", cte=_transfer_encoding(rendered.html)
    )
    return msg


def message_to_bytes(msg: EmailMessage) -> bytes:
    """The message as SMTP wants it: CRLF line ends, lines within RFC 5322 limits."""
    return msg.as_bytes(policy=_POLICY)


# -- the campaign skeleton: the stdlib's work done once per campaign ----------------------------

# An address the fast path may write as is: ASCII, one @, nothing that needs quoting.
_PLAIN_ADDRESS: Final = re.compile(r"[A-Za-z0-9.!#$%&'*+/=?^_`{|}~-]+@[A-Za-z0-9.-]+")
# A display name made of atoms and spaces only needs no quoting (RFC 5322 3.2.3).
_PLAIN_NAME: Final = re.compile(r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~ -]+")
# Bytes of UTF-8 per encoded word: 45 bytes are 60 base64 characters, so a word is at most
# 72 columns and a folded line (one leading space) stays within 78.
_WORD_BYTES: Final = 45


def _encoded_words(text: str, first: int = _WORD_BYTES) -> list[str]:
    """``text`` as RFC 2047 base64 encoded words, cut at character boundaries; the first word
    holds at most ``first`` bytes (it shares its line with the field name).

    Whitespace between adjacent encoded words is ignored by readers, so the words can be
    folded anywhere between them without changing the decoded text.
    """
    words: list[str] = []
    chunk = bytearray()
    limit = first
    for char in text:
        data = char.encode("utf-8")
        if len(chunk) + len(data) > limit and chunk:
            limit = _WORD_BYTES
            words.append(bytes(chunk).decode("utf-8"))
            chunk.clear()
        chunk += data
    if chunk or not words:
        words.append(bytes(chunk).decode("utf-8"))
    return [f"=?utf-8?b?{base64.b64encode(w.encode('utf-8')).decode('ascii')}?=" for w in words]


def _header_line(name: str, value: str) -> bytes:
    """One folded header field. ASCII values are folded at spaces, never encoded; others (and
    values that would read as encoded words) become encoded words, one per line."""
    if value.isascii() and "=?" not in value:
        lines = _wrap(f"{name}: {value}")
    else:
        # "=?utf-8?b?" + "?=" is 12 columns; base64 makes 4 of every 3 bytes.
        first = max(4, (_MAX_LINE - len(name) - 2 - 12) // 4 * 3)
        words = _encoded_words(value, first)
        lines = [f"{name}: {words[0]}", *(f" {w}" for w in words[1:])]
    return ("\r\n".join(lines) + "\r\n").encode("ascii")


def _display_name(name: str) -> str:
    """A display name as it goes before ``<addr>``: bare, quoted, or encoded words."""
    if _PLAIN_NAME.fullmatch(name):
        return name
    if name.isascii() and "=?" not in name:
        return '"' + name.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return " ".join(_encoded_words(name))


def _recipient_spec(to_addr: str) -> str:
    """``to_addr`` as an addr-spec; the fast path for the plain addresses a ledger holds."""
    if _PLAIN_ADDRESS.fullmatch(to_addr):
        return to_addr
    return parse_address(to_addr, what="To").addr_spec


def _body_part(content_type: str, body: str) -> tuple[bytes, bytes]:
    """The MIME part headers and the encoded body (CRLF line ends, trailing CRLF)."""
    text = "\n".join(body.splitlines()) + "\n"
    cte = _transfer_encoding(text)
    if cte == "7bit":
        encoded = text.replace("\n", "\r\n").encode("ascii")
    elif cte == "quoted-printable":
        encoded = binascii.b2a_qp(text.encode("utf-8"), istext=True).replace(b"\n", b"\r\n")
    else:
        encoded = _base64_lines(text.replace("\n", "\r\n").encode("utf-8"))
    head = (
        f'Content-Type: {content_type}; charset="utf-8"\r\nContent-Transfer-Encoding: {cte}\r\n\r\n'
    ).encode("ascii")
    return head, encoded


def _base64_lines(data: bytes) -> bytes:
    """Base64 in 76-character lines, each ended by CRLF (RFC 2045), as ``encodebytes`` makes
    them but a third cheaper: one encoding call, then slicing, instead of one call per line."""
    flat = binascii.b2a_base64(data, newline=False)
    if not flat:
        return b""
    # Joined by the separator: a fifth cheaper than adding CRLF to each slice first.
    return b"\r\n".join([flat[i : i + 76] for i in range(0, len(flat), 76)]) + b"\r\n"


class MessageSkeleton:
    """What every message of a campaign shares, parsed, checked and encoded once.

    ``build`` then fills in one recipient's parts: To, Subject, Date, Message-ID, per-message
    headers and the two bodies. The result reads the same as ``build_message`` (a test checks
    both through the stdlib parser) at a fraction of the cost, because the stdlib's header
    parsing and folding, which dominate ``EmailMessage``, run here once instead of per message.
    Create it with :func:`build_skeleton`.
    """

    def __init__(self, *, from_addr: str, reply_to: str | None, headers: Mapping[str, str]):
        self.sender = parse_address(from_addr, what="From")
        shared = EmailMessage(policy=_POLICY)
        shared["From"] = self.sender
        if reply_to:
            shared["Reply-To"] = parse_address(reply_to, what="Reply-To")
        # The stdlib folds and encodes From / Reply-To once; the header block is reused as is.
        self._shared = message_to_bytes(shared).split(b"\r\n\r\n", 1)[0] + b"\r\n"
        self._shared += b"".join(_header_line(*_checked_header(n, v)) for n, v in headers.items())
        self._boundary = "=_mk_" + secrets.token_hex(12)

    def build(
        self,
        rendered: RenderedMessage,
        *,
        to_addr: str,
        to_name: str | None = None,
        message_id: str,
        date: datetime | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> bytes:
        """The wire bytes (CRLF) of one recipient's message; ``message_id`` like ``<x@y>``.

        Raises AddressError for a bad address and for CR/LF in any header value.
        """
        spec = _recipient_spec(to_addr)
        name = " ".join(to_name.split()) if to_name else ""
        to_line = f"To: {_display_name(name)} <{spec}>" if name else f"To: {spec}"
        _check_line("Subject", rendered.subject)
        _check_line("Message-ID", message_id)
        if date is not None and date.tzinfo is None:
            raise ValueError(f"naive date {date!r}: pass a timezone-aware datetime")
        parts = [
            self._shared,
            ("\r\n".join(_wrap(to_line)) + "\r\n").encode("ascii"),
            _header_line("Subject", rendered.subject),
            _date_line((date or utcnow()).replace(microsecond=0)),
            f"Message-ID: {message_id}\r\n".encode(),
        ]
        for field_name, value in (headers or {}).items():
            parts.append(_header_line(*_checked_header(field_name, value)))
        text_head, text_body = _body_part("text/plain", rendered.text)
        html_head, html_body = _body_part("text/html", rendered.html)
        boundary = self._boundary
        if boundary.encode() in text_body or boundary.encode() in html_body:
            boundary = "=_mk_" + secrets.token_hex(16)  # a 7bit body happened to contain it
        delimiter = f"--{boundary}\r\n".encode("ascii")
        # The CRLF before a delimiter belongs to the delimiter (RFC 2046 5.1.1), so a body's
        # own last line break needs one more to survive.
        parts += [
            b"MIME-Version: 1.0\r\n",
            f'Content-Type: multipart/alternative;\r\n boundary="{boundary}"\r\n\r\n'.encode(),
            delimiter,
            text_head,
            text_body,
            b"\r\n",
            delimiter,
            html_head,
            html_body,
            f"\r\n--{boundary}--\r\n".encode("ascii"),
        ]
        return b"".join(parts)


@functools.lru_cache(maxsize=8)
def _date_line(date: datetime) -> bytes:
    # A campaign sends hundreds of messages within one second, and the Date field shows seconds
    # only: formatting it once per second saves a noticeable part of building a message.
    return f"Date: {format_datetime(date)}\r\n".encode()


def _checked_header(name: str, value: str) -> tuple[str, str]:
    if not name or not name.isascii() or not all(33 <= ord(c) <= 126 for c in name):
        raise AddressError(f"header name {name!r} is not a valid field name")
    if ":" in name or name.lower() in _OWN_HEADERS:
        raise AddressError(f"header {name!r} is set by the message builder and cannot be passed")
    _check_line(f"header {name}", value)
    return name, value


def build_skeleton(
    *, from_addr: str, reply_to: str | None = None, headers: Mapping[str, str] | None = None
) -> MessageSkeleton:
    """The campaign-wide part of its messages (From, Reply-To, fixed extra headers), checked
    once; raises AddressError like ``build_message``."""
    return MessageSkeleton(from_addr=from_addr, reply_to=reply_to, headers=headers or {})
