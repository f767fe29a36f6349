"""The SMTP edge: URLs, TLS contexts, one persistent connection, and reply classification.

Everything aiosmtplib raises is translated here, once. What concerns the whole server (cannot
connect, TLS fails, login refused) raises ``SMTPDeliveryError``; what concerns one message is
an ``Outcome`` the caller records in the ledger:

    sent     the server took responsibility for the message (2xx after DATA)
    bounce   the address is bad (5.1.x, or 550/551/553 at RCPT): suppress it
    defer    a temporary failure or a dropped connection before the message was handed over:
             retry later, the message is never lost
    fail     a permanent failure of this message that says nothing about the address
    unknown  the connection ended after the whole message was sent but before the server
             replied: it may have been delivered, so retrying could duplicate it
    withheld the caller's ``before_end`` said no: the final dot was never sent and the
             connection was dropped, so the server discarded the message (RFC 5321 4.1.1.4)
    stop     an authentication or policy refusal (5.7.x, 530, 535): every further message
             would fail the same way, so stop the campaign and fix the cause

TLS is never optional once asked for: ``smtp+starttls://`` and ``smtps://`` either get a
verified TLS session or raise; nothing falls back to plaintext.
"""

from __future__ import annotations

import asyncio
import ipaddress
import math
import os
import re
import socket
import ssl
from dataclasses import dataclass, field
from email.utils import parseaddr
from types import TracebackType
from typing import Literal, cast
from urllib.parse import parse_qs, unquote, urlsplit

import aiosmtplib
from aiosmtplib import (
    SMTPAuthenticationError,
    SMTPConnectError,
    SMTPConnectTimeoutError,
    SMTPException,
    SMTPHeloError,
    SMTPResponseException,
    SMTPServerDisconnected,
    SMTPTimeoutError,
)

from ..errors import ConfigError, SMTPDeliveryError
from ._wire import Wire

__all__ = [
    "Outcome",
    "OutcomeKind",
    "SMTPConnection",
    "SMTPTarget",
    "Security",
    "Stage",
    "classify_reply",
    "parse_smtp_url",
    "ssl_context_for",
]

Security = Literal["none", "starttls", "tls"]
OutcomeKind = Literal["sent", "bounce", "defer", "fail", "unknown", "stop", "withheld"]
Stage = Literal["connect", "mail", "rcpt", "data", "data_end"]

DEFAULT_TIMEOUT = 30.0
# RFC 5321 4.5.3.2.6: wait 10 minutes for the reply to the final dot. Giving up sooner turns a
# slow content scan into an "unknown" outcome, which needs a human to resolve.
DATA_END_TIMEOUT = 600.0
_SCHEMES: dict[str, tuple[Security, int]] = {
    "smtp": ("none", 25),
    "smtp+starttls": ("starttls", 587),
    "smtps": ("tls", 465),
}
_URL_EXAMPLE = "smtp+starttls://user:password@mail.example.com:587?timeout=30"
_ENHANCED = re.compile(r"^\s*([245]\.\d{1,3}\.\d{1,3})(?![\d.])")
_AUTH_CODES = frozenset({530, 534, 535, 538})
_ADDRESS_CODES = frozenset({550, 551, 553})
# asyncio's write-buffer high-water mark: a write up to it never waits for the server.
_HOLD_BACK_ABOVE = 64 * 1024


# -- where to connect -----------------------------------------------------------------------


@dataclass(frozen=True)
class SMTPTarget:
    """An SMTP server and how to talk to it; ``repr`` never shows the password."""

    host: str
    port: int
    security: Security = "none"
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    timeout: float = DEFAULT_TIMEOUT
    #: How long to wait for the reply to the end of the data (RFC 5321: 10 minutes).
    data_timeout: float = DATA_END_TIMEOUT

    @property
    def safe_url(self) -> str:
        """The target as a URL without the password, for messages and logs."""
        scheme = next(s for s, (sec, _) in _SCHEMES.items() if sec == self.security)
        user = f"{self.username}@" if self.username else ""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{scheme}://{user}{host}:{self.port}"

    @property
    def where(self) -> str:
        """``host:port`` for messages."""
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def _redact(url: str) -> str:
    return re.sub(r"(//[^/@:]*:)[^@/]*@", r"\1***@", url)


def _bad_url(url: str, problem: str) -> ConfigError:
    return ConfigError(f"bad SMTP URL {_redact(url)!r}: {problem}; e.g. {_URL_EXAMPLE}")


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def parse_smtp_url(url: str) -> SMTPTarget:
    """An ``SMTPTarget`` from ``smtp://``, ``smtp+starttls://`` or ``smtps://`` URLs.

    ``smtp://host:25`` is plain SMTP (default port 25); ``smtp+starttls://user:pass@host:587``
    requires STARTTLS; ``smtps://host:465`` is TLS from the first byte. ``?timeout=30`` sets
    the per-command timeout in seconds, ``?data_timeout=600`` the wait for the reply to the
    end of the data (a message without that reply is ``unknown``). User and password are
    percent-decoded; when the URL has none, ``MAILKIT_SMTP_USER`` / ``MAILKIT_SMTP_PASSWORD``
    fill them in. Credentials are refused over plain SMTP except to a loopback address.
    """
    if not isinstance(url, str) or not url.strip():
        raise ConfigError(f"no SMTP URL given; e.g. {_URL_EXAMPLE}")
    url = url.strip()
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise _bad_url(url, str(exc)) from None
    scheme = parts.scheme.lower()
    if scheme not in _SCHEMES:
        raise _bad_url(
            url, f"unknown scheme {parts.scheme!r}, use smtp://, smtp+starttls:// or smtps://"
        )
    security, default_port = _SCHEMES[scheme]
    host = parts.hostname
    if not host:
        raise _bad_url(url, "no host")
    if port is None:
        port = default_port
    if port == 0:
        raise _bad_url(url, "port 0 is not a server port")
    if parts.path not in ("", "/") or parts.fragment:
        raise _bad_url(url, "an SMTP URL has no path or #fragment")
    query = parse_qs(parts.query, keep_blank_values=True)
    unknown = sorted(set(query) - {"timeout", "data_timeout"})
    if unknown:
        raise _bad_url(
            url, f"unknown parameter(s) {', '.join(unknown)} (only timeout=, data_timeout=)"
        )
    timeout = _seconds(url, query, "timeout", DEFAULT_TIMEOUT)
    data_timeout = _seconds(url, query, "data_timeout", DATA_END_TIMEOUT)

    username = unquote(parts.username) if parts.username else None
    password = unquote(parts.password) if parts.password is not None else None
    if username is None and password is None:
        username = os.environ.get("MAILKIT_SMTP_USER") or None
        password = os.environ.get("MAILKIT_SMTP_PASSWORD") or None
    elif password is None:
        password = os.environ.get("MAILKIT_SMTP_PASSWORD") or None
    if password is not None and username is None:
        raise _bad_url(url, "a password without a user name (set MAILKIT_SMTP_USER too)")
    if username is not None and security == "none" and not _is_loopback(host):
        raise _bad_url(
            url,
            f"refusing to send credentials unencrypted to {host}; "
            "use smtp+starttls:// (port 587) or smtps:// (port 465)",
        )
    return SMTPTarget(host, port, security, username, password, timeout, data_timeout)


def _seconds(url: str, query: dict[str, list[str]], name: str, default: float) -> float:
    if name not in query:
        return default
    raw = query[name][-1]
    try:
        value = float(raw)
    except ValueError:
        raise _bad_url(url, f"{name}={raw!r} is not a number of seconds") from None
    if not (math.isfinite(value) and value > 0):
        raise _bad_url(url, f"{name} must be a positive number of seconds")
    return value


def ssl_context_for(target: SMTPTarget, cafile: str | None = None) -> ssl.SSLContext:
    """A verifying client SSLContext: system CAs plus ``cafile`` / ``MAILKIT_SMTP_CAFILE``."""
    cafile = cafile or os.environ.get("MAILKIT_SMTP_CAFILE") or None
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if cafile is not None:
        try:
            context.load_verify_locations(cafile=cafile)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(
                f"cannot load the CA file {cafile!r} for {target.where}: {exc}; "
                "MAILKIT_SMTP_CAFILE must name a PEM file with the CA certificate(s)"
            ) from exc
    return context


# -- what happened to one message ---------------------------------------------------------------


@dataclass(frozen=True)
class Outcome:
    """What became of one message: see the module docstring for the kinds."""

    kind: OutcomeKind
    code: int | None
    reply: str
    stage: Stage | None = None

    @property
    def enhanced(self) -> str | None:
        """The RFC 3463 enhanced status code in the reply (``"5.1.1"``), if any."""
        text = self.reply[4:] if self.code is not None else self.reply
        match = _ENHANCED.match(text)
        return match.group(1) if match else None

    @property
    def closes_connection(self) -> bool:
        """421: the server is closing this connection (the next send reconnects)."""
        return self.code == 421


def classify_reply(code: int | None, message: str, stage: Stage) -> Outcome:
    """The ``Outcome`` of a server reply (``code=None``: no reply, the connection ended)."""
    if code is None:
        kind: OutcomeKind = "unknown" if stage == "data_end" else "defer"
        return Outcome(kind, None, message, stage)
    reply = f"{code} {message}".rstrip()
    match = _ENHANCED.match(message)
    enhanced = match.group(1) if match else None
    generic = enhanced in (None, "5.0.0")
    if 200 <= code < 300:
        kind = "sent"
    elif 400 <= code < 500:
        kind = "defer"
    elif 500 <= code < 600:
        if (enhanced or "").startswith("5.7.") or code in _AUTH_CODES or stage == "connect":
            kind = "stop"
        elif stage == "mail" and ((enhanced or "").startswith("5.1.") or code in _ADDRESS_CODES):
            kind = "stop"  # the sender is refused: every message of the campaign would be
        elif (enhanced or "").startswith("5.1.") or (
            stage == "rcpt" and code in _ADDRESS_CODES and generic
        ):
            kind = "bounce"
        else:
            kind = "fail"
    else:
        # Not a final reply at all: after the data it may have been taken, before it was not.
        kind = "unknown" if stage == "data_end" else "defer"
    return Outcome(kind, code, reply, stage)


def _lost(stage: Stage, exc: BaseException) -> Outcome:
    if stage == "data_end":
        text = (
            f"no reply after the message was sent ({exc}); it may or may not have been "
            "delivered, so it is not retried automatically"
        )
    else:
        text = f"connection lost or timed out at {stage.upper().replace('_', ' ')} ({exc}); retry"
    return classify_reply(None, text, stage)


# -- the connection ---------------------------------------------------------------------------


class _TransientConnectError(Exception):
    """Connecting failed in a way that may pass (timeout, 4xx greeting, dropped)."""


_DOT_LINE = re.compile(rb"\n\.")  # re's search is twice as fast as bytes' ``in`` here


def _wire_body(message: bytes, *, crlf: bool = False) -> bytes:
    """CRLF line endings and dot-stuffing (RFC 5321 4.5.2), without the final ``.`` line.

    ``crlf``: the message is known to end its lines with CRLF only, as mailkit's message
    builder makes them, which spares counting them.
    """
    if crlf:
        body = message
    else:
        crlf_count = message.count(b"\r\n")
        # Counting is far cheaper than a regex pass, and most messages are CRLF already.
        if message.count(b"\n") == crlf_count and message.count(b"\r") == crlf_count:
            body = message
        else:
            body = re.sub(rb"\r\n|\r|\n", b"\r\n", message)
    if not body.endswith(b"\r\n"):
        body += b"\r\n"
    if body.startswith(b".") or _DOT_LINE.search(body):
        body = re.sub(rb"(?m)^\.", b"..", body)
    return body


class SMTPConnection:
    """One persistent SMTP connection, reused for many messages, one recipient each.

    ``send`` opens it on first use and reconnects when the server dropped an idle connection.
    Use as ``async with SMTPConnection(url) as conn: outcome = await conn.send(...)``.
    """

    def __init__(
        self,
        target: SMTPTarget | str,
        *,
        ssl_context: ssl.SSLContext | None = None,
        local_hostname: str | None = None,
    ) -> None:
        self.target = parse_smtp_url(target) if isinstance(target, str) else target
        self._ssl_context = ssl_context
        self._local_hostname = local_hostname
        # aiosmtplib opens the session; then the mail transactions run on our Wire.
        self._smtp: aiosmtplib.SMTP | None = None
        self._wire: Wire | None = None
        self._extensions: frozenset[str] = frozenset()
        self._lock = asyncio.Lock()

    @property
    def is_open(self) -> bool:
        """Whether the connection is (as far as we know) open."""
        return self._wire is not None and self._wire.is_open

    @property
    def pipelining(self) -> bool:
        """Whether the open session sends MAIL, RCPT and DATA together (server offers it)."""
        return "pipelining" in self._extensions

    async def __aenter__(self) -> SMTPConnection:
        await self.open()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def open(self) -> None:
        """Connect, secure and log in now; any failure raises ``SMTPDeliveryError``."""
        async with self._lock:
            if self.is_open:
                return
            try:
                await self._connect()
            except _TransientConnectError as exc:
                raise SMTPDeliveryError(str(exc), url=self.target.safe_url) from exc.__cause__

    async def ensure_open(self) -> Outcome | None:
        """Connect now unless connected. A server that cannot be used at all raises
        ``SMTPDeliveryError``; one that is only busy (4xx greeting, timeout, dropped) returns a
        ``defer`` Outcome at stage ``connect``; None when the connection is ready."""
        async with self._lock:
            if self.is_open:
                return None
            return await self._connect_for_send()

    async def close(self) -> None:
        """Say QUIT (best effort) and close."""
        wire, smtp = self._wire, self._smtp
        self._wire = self._smtp = None
        try:
            if wire is not None and wire.is_open:
                wire.write(b"QUIT\r\n")
                await wire.read_reply(self.target.timeout)
        except (SMTPException, OSError):
            pass  # the server is gone or rude; we are leaving anyway
        finally:
            if wire is not None:
                wire.close()
            if smtp is not None:
                smtp.close()

    async def send(
        self,
        sender: str,
        recipient: str,
        message: bytes,
        *,
        before_end: asyncio.Future[bool] | None = None,
        crlf: bool = False,
    ) -> Outcome:
        """Send ``message`` to one recipient and say what happened.

        Per-message problems are an ``Outcome``; a server that cannot be used at all (refused
        connection, TLS or login failure) raises ``SMTPDeliveryError``.

        ``before_end`` holds back the data's final dot, before which a server delivers
        nothing, until it resolves: on True the dot follows; on False (or an exception, which
        propagates) the connection is dropped instead, the server discards the message, and
        the outcome is ``withheld``. A transaction refused before the data does not wait for it.

        ``crlf=True`` says that ``message`` ends its lines with CRLF only (mailkit's message
        builder guarantees it), which spares checking; other line ends are converted.
        """
        for address in (sender, recipient):
            if any(ch in address for ch in "\r\n\0"):
                return Outcome("fail", None, f"address {address!r} contains a control character")
        async with self._lock:
            reused = self.is_open
            if not reused:
                lost = await self._connect_for_send()
                if lost is not None:
                    return lost
            outcome, retry = await self._envelope(sender, recipient, message)
            if retry and reused:
                # The server closed the idle connection (timeout, 421): nothing of this message
                # was taken yet, so one fresh connection is safe.
                self._drop()
                lost = await self._connect_for_send()
                if lost is not None:
                    return lost
                outcome, _ = await self._envelope(sender, recipient, message)
            if outcome is not None:
                return outcome
            return await self._data(message, before_end, crlf)

    # -- internals -----------------------------------------------------------------------

    def _drop(self) -> None:
        if self._wire is not None:
            self._wire.abort()
        if self._smtp is not None:
            self._smtp.close()
        self._wire = self._smtp = None

    async def _connect_for_send(self) -> Outcome | None:
        try:
            await self._connect()
        except _TransientConnectError as exc:
            return classify_reply(None, str(exc), "connect")
        return None

    def _fail(self, message: str) -> SMTPDeliveryError:
        return SMTPDeliveryError(f"{self.target.safe_url}: {message}", url=self.target.safe_url)

    async def _connect(self) -> None:
        """Open the session; raises SMTPDeliveryError, or _TransientConnectError."""
        target = self.target
        context = None
        if target.security != "none":
            context = self._ssl_context or ssl_context_for(target)
        # start_tls is always explicit: aiosmtplib >= 2 upgrades opportunistically when it is
        # None, and we do STARTTLS ourselves below so that "not offered" can never be skipped.
        smtp = aiosmtplib.SMTP(
            hostname=target.host,
            port=target.port,
            timeout=target.timeout,
            use_tls=target.security == "tls",
            start_tls=False,
            tls_context=context if target.security == "tls" else None,
            local_hostname=self._local_hostname,
        )
        try:
            await smtp.connect()
            await self._ehlo(smtp)
            if target.security == "starttls":
                if not smtp.supports_extension("starttls"):
                    raise self._fail(
                        "the server does not offer STARTTLS but the URL requires it "
                        "(smtp+starttls://); refusing to send in plaintext. Use smtps:// if "
                        "the port speaks TLS from the start, or fix the server's TLS setup"
                    )
                assert context is not None
                await smtp.starttls(tls_context=context, server_hostname=target.host)
                await self._ehlo(smtp)
            if target.security != "none" and smtp.get_transport_info("sslcontext") is None:
                raise self._fail("TLS was required but the session is not encrypted")
            if target.username is not None:
                await self._login(smtp)
        except SMTPDeliveryError:
            smtp.close()
            raise
        except (SMTPException, ssl.SSLError, OSError) as exc:
            smtp.close()
            raise self._translate_connect_error(exc) from exc
        transport = smtp.transport
        # Not an isinstance check: uvloop's transports have asyncio.Transport's methods
        # without deriving from it.
        if transport is None or transport.is_closing():
            smtp.close()
            raise _TransientConnectError(f"{target.where} closed the connection after login")
        self._smtp = smtp
        self._extensions = frozenset(smtp.esmtp_extensions)
        self._wire = Wire(cast(asyncio.Transport, transport))

    @staticmethod
    async def _ehlo(smtp: aiosmtplib.SMTP) -> None:
        try:
            await smtp.ehlo()
        except SMTPHeloError as exc:
            if exc.code >= 500 and smtp.is_connected:
                await smtp.helo()  # an old server without ESMTP
            else:
                raise

    async def _login(self, smtp: aiosmtplib.SMTP) -> None:
        target = self.target
        if not smtp.supports_extension("auth"):
            raise self._fail(
                "the server does not offer AUTH but the URL has credentials; remove them or "
                "check that this is the submission port"
            )
        try:
            await smtp.login(target.username or "", target.password or "")
        except SMTPAuthenticationError as exc:
            # The reply names the problem; the password itself is never part of any message.
            raise self._fail(
                f"login as {target.username!r} refused: {exc.code} {exc.message}. Check the "
                "user name and password (URL or MAILKIT_SMTP_USER / MAILKIT_SMTP_PASSWORD)"
            ) from None

    def _translate_connect_error(self, exc: BaseException) -> Exception:
        where = self.target.where
        cause = exc.__cause__ if isinstance(exc, SMTPConnectError) else exc
        if isinstance(cause, ssl.SSLError):
            hint = (
                "if the server uses a private CA, set MAILKIT_SMTP_CAFILE to its CA certificate"
                if isinstance(cause, ssl.SSLCertVerificationError)
                else "check that the port speaks TLS the way the URL says "
                "(smtps:// = TLS from the start, usually 465; smtp+starttls:// = 587)"
            )
            return self._fail(
                f"TLS with {where} failed ({cause}); {hint}. Not falling back to plaintext"
            )
        if isinstance(exc, SMTPConnectTimeoutError | SMTPTimeoutError | SMTPServerDisconnected):
            return _TransientConnectError(f"{where}: {exc}")
        if isinstance(exc, SMTPResponseException):
            # A greeting, EHLO or STARTTLS refusal: 4xx may pass, 5xx will not.
            text = f"{where} refused the session: {exc.code} {exc.message}"
            if 400 <= exc.code < 500:
                return _TransientConnectError(text)
            return self._fail(text)
        if isinstance(cause, ConnectionRefusedError):
            return self._fail(
                f"cannot connect to {where}: connection refused. Check the host and port in "
                "the SMTP URL and that the server is running (a local test server: "
                "`mailkit sink --port N`)"
            )
        if isinstance(cause, socket.gaierror):
            return self._fail(f"cannot resolve the host {self.target.host!r}: {cause}")
        if isinstance(exc, SMTPConnectError) and isinstance(cause, SMTPServerDisconnected):
            return _TransientConnectError(f"{where} closed the connection before greeting")
        return self._fail(f"cannot use {where}: {exc}")

    async def _envelope(
        self, sender: str, recipient: str, message: bytes
    ) -> tuple[Outcome | None, bool]:
        """MAIL FROM, RCPT TO and DATA, in one write when the server offers PIPELINING.

        (None, False) when the server is ready for the data (354); else the outcome and
        whether a fresh connection may help (the server dropped or 421'd before taking any of
        it, as an idle connection's server does).
        """
        wire = self._wire
        assert wire is not None
        extensions = self._extensions
        options: list[bytes] = []
        utf8 = not (sender.isascii() and recipient.isascii())
        if utf8:
            if "smtputf8" not in extensions:
                return Outcome(
                    "fail", None, "non-ASCII address but the server lacks SMTPUTF8", "mail"
                ), False
            options.append(b" SMTPUTF8")
        if not message.isascii():
            if "8bitmime" not in extensions:
                return Outcome(
                    "fail",
                    None,
                    "8-bit message data but the server lacks 8BITMIME; "
                    "build the message with 7-bit transfer encodings",
                    "mail",
                ), False
            options.append(b" BODY=8BITMIME")
        if "size" in extensions:
            options.append(b" SIZE=%d" % len(message))
        encoding = "utf-8" if utf8 else "ascii"
        commands: tuple[tuple[bytes, Stage], ...] = (
            (b"MAIL FROM:" + _path(sender, encoding) + b"".join(options) + b"\r\n", "mail"),
            (b"RCPT TO:" + _path(recipient, encoding) + b"\r\n", "rcpt"),
            (b"DATA\r\n", "data"),
        )
        pipelined = "pipelining" in extensions
        timeout = self.target.timeout
        try:
            if pipelined:
                wire.write(b"".join(command for command, _ in commands))
        except SMTPException as exc:
            self._drop()
            return _lost("mail", exc), True
        for index, (command, stage) in enumerate(commands):
            try:
                if not pipelined:
                    wire.write(command)
                reply = await wire.read_reply(timeout)
            except (SMTPException, OSError) as exc:
                self._drop()
                return _lost(stage, exc), stage == "mail"
            if (reply.code == 354) if stage == "data" else (200 <= reply.code < 300):
                continue
            outcome = classify_reply(reply.code, reply.message, stage)
            if outcome.kind == "sent":  # a 2xx to DATA: the server is confused, nothing was taken
                outcome = Outcome("defer", reply.code, f"{outcome.reply} (DATA needs 354)", stage)
            if reply.code == 421:
                self._drop()
                return outcome, stage == "mail"
            await self._abandon(len(commands) - index - 1 if pipelined else 0)
            return outcome, False
        return None, False

    async def _abandon(self, pending: int) -> None:
        """End a refused transaction so the connection can carry the next message: take the
        replies of the commands still in flight, close a DATA the server accepted anyway with
        an empty message (RFC 2920 3.1; it has no recipients), then RSET."""
        wire = self._wire
        assert wire is not None
        timeout = self.target.timeout
        try:
            for _ in range(pending):
                reply = await wire.read_reply(timeout)
                if reply.code == 354:
                    wire.write(b".\r\n")
                    await wire.read_reply(timeout)
            wire.write(b"RSET\r\n")
            if (await wire.read_reply(timeout)).code // 100 == 2:
                return
        except (SMTPException, OSError):
            pass
        self._drop()

    async def _data(
        self, message: bytes, before_end: asyncio.Future[bool] | None, crlf: bool
    ) -> Outcome:
        """The message after the server's 354, and its final reply."""
        wire = self._wire
        assert wire is not None
        body = _wire_body(message, crlf=crlf)
        end = b".\r\n"
        # The final "." is held back while the caller has not agreed yet, and for a large
        # message until the rest has left our buffers: a server that dropped the connection
        # mid-data then provably never saw the end of it, so the message is retried rather
        # than left unknown. A small one goes in one write otherwise; holding its dot back
        # would only cost a system call, as the transport takes it whole without a turn of the
        # event loop in between.
        held = before_end is not None and not _is_open(before_end)
        try:
            if held or len(body) > _HOLD_BACK_ABOVE:
                wire.write(body)
                if len(body) > _HOLD_BACK_ABOVE:
                    await wire.drain()
            else:
                end = body + end
        except (SMTPException, OSError) as exc:
            self._drop()
            return _lost("data", exc)
        if held:
            assert before_end is not None
            try:
                go = await before_end
            except BaseException:
                self._drop()
                raise
            if not go:
                self._drop()
                return Outcome(
                    "withheld",
                    None,
                    "the end of the data was withheld and the connection dropped: the server "
                    "discarded the message",
                    "data",
                )
        try:
            # Wire.write raises before writing anything on a lost connection: the server then
            # never saw the end of the data.
            wire.write(end)
        except (SMTPException, OSError) as exc:
            self._drop()
            return _lost("data", exc)
        # From here on the server may have the whole message: anything but a reply is
        # "unknown", never "defer".
        try:
            final = await wire.read_reply(self.target.data_timeout)
        except (SMTPException, OSError) as exc:
            self._drop()
            return _lost("data_end", exc)
        outcome = classify_reply(final.code, final.message, "data_end")
        if outcome.closes_connection:
            self._drop()
        return outcome


def _is_open(gate: asyncio.Future[bool]) -> bool:
    return gate.done() and not gate.cancelled() and gate.exception() is None and gate.result()


def _path(address: str, encoding: str) -> bytes:
    """``<address>`` for MAIL FROM / RCPT TO (a display-name form is reduced to the address)."""
    if "<" in address or " " in address:
        address = parseaddr(address)[1] or address
    return b"<" + address.encode(encoding) + b">"
