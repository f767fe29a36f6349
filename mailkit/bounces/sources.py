"""Where bounces come from: a registry of pluggable sources, all feeding the same parser.

A source yields ``InboundMessage`` records (raw bytes and where they came from) and is told
``mark_done`` once a message is safely recorded, so a mailbox can flag it only then. Sources are
opened from a string, by URL scheme, through a registry (in the manner of papermill's I/O
handlers), so another kind of mailbox plugs in with ``register_source``:

- a path: a ``.eml`` file, an mbox file (starts with ``From ``), a Maildir folder (``cur/``,
  ``new/``), or a folder of ``.eml`` files;
- ``imaps://user@host[:port]/MAILBOX``: an IMAP mailbox over TLS; ``imap://`` upgrades with
  STARTTLS and refuses to go on without it. UNSEEN messages are read (``BODY.PEEK[]``, so
  reading alone marks nothing) and flagged ``\\Seen`` after each is recorded. The password comes
  from the URL or ``MAILKIT_IMAP_PASSWORD``; ``MAILKIT_IMAP_CAFILE`` adds a CA to trust.

The SMTP listener (``listener.py``) pushes messages instead of being read, so it is not here.
"""

from __future__ import annotations

import hashlib
import imaplib
import mailbox
import os
import re
import ssl
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from urllib.parse import unquote, urlsplit

from ..errors import ConfigError, MailboxError, NotFoundError

__all__ = [
    "BounceSource",
    "ImapSource",
    "InboundMessage",
    "LocalSource",
    "open_source",
    "register_source",
]


@dataclass(frozen=True)
class InboundMessage:
    """One inbound message. ``error`` is set when it could not even be read (kept aside)."""

    raw: bytes
    source: str
    envelope_rcpts: tuple[str, ...] = ()
    key: str = ""
    error: str | None = None

    @property
    def digest(self) -> str:
        """SHA-256 of the message with line endings normalised: the same mail read from an
        mbox (LF) and over IMAP (CRLF) is one message."""
        if self.error is not None:  # unreadable: one reject per place, not per attempt
            return hashlib.sha256(b"unreadable\x00" + self.source.encode()).hexdigest()
        body = self.raw.replace(b"\r\n", b"\n").strip()
        return hashlib.sha256(body).hexdigest()


class BounceSource:
    """Base of every source: iterate ``fetch_messages()``; call ``mark_done`` after recording."""

    name = "source"

    def fetch_messages(self) -> Iterator[InboundMessage]:
        raise NotImplementedError

    def mark_done(self, message: InboundMessage) -> None:
        """Called once ``message`` is recorded; files need nothing, mailboxes flag it."""

    def close(self) -> None:
        """Release connections and files."""

    def __enter__(self) -> BounceSource:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


SourceFactory = Callable[[str], BounceSource]
_REGISTRY: dict[str, SourceFactory] = {}


def register_source(scheme: str, factory: SourceFactory) -> None:
    """Make ``open_source`` open ``scheme://...`` strings with ``factory(spec)``."""
    if not re.fullmatch(r"[a-z][a-z0-9+.\-]*", scheme):
        raise ValueError(f"not a URL scheme: {scheme!r}")
    _REGISTRY[scheme] = factory


def open_source(spec: str | os.PathLike[str] | BounceSource) -> BounceSource:
    """The source a path or URL names (a ready ``BounceSource`` is returned as it is)."""
    if isinstance(spec, BounceSource):
        return spec
    text = os.fspath(spec)
    scheme = text.split("://", 1)[0].lower() if "://" in text else ""
    if scheme and scheme != "file":
        factory = _REGISTRY.get(scheme)
        if factory is None:
            known = ", ".join(sorted(f"{s}://" for s in _REGISTRY)) or "none"
            raise ConfigError(f"no bounce source for {scheme}:// (known: {known}, or a path)")
        return factory(text)
    return LocalSource(text.removeprefix("file://"))


# -- files, mbox, Maildir ------------------------------------------------------------------------


class LocalSource(BounceSource):
    """A ``.eml`` file, an mbox file, a Maildir, or a folder of ``.eml`` files."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path).expanduser()
        if not self.path.exists():
            raise NotFoundError("file or folder", str(self.path))
        self.name = str(self.path)

    def fetch_messages(self) -> Iterator[InboundMessage]:
        path = self.path
        if path.is_dir() and (path / "cur").is_dir() and (path / "new").is_dir():
            yield from self._maildir(path)
        elif path.is_dir():
            for child in sorted(path.glob("*.eml")):
                yield self._file(child)
        elif _is_mbox(path):
            yield from self._mbox(path)
        else:
            yield self._file(path)

    @staticmethod
    def _file(path: Path) -> InboundMessage:
        try:
            return InboundMessage(path.read_bytes(), f"file:{path}")
        except OSError as exc:
            return InboundMessage(b"", f"file:{path}", error=f"cannot read: {exc.strerror}")

    @staticmethod
    def _mbox(path: Path) -> Iterator[InboundMessage]:
        box = mailbox.mbox(path, create=False)
        try:
            for number, key in enumerate(box.iterkeys(), start=1):
                yield InboundMessage(box.get_bytes(key), f"mbox:{path}#{number}")
        finally:
            box.close()

    @staticmethod
    def _maildir(path: Path) -> Iterator[InboundMessage]:
        box = mailbox.Maildir(path, factory=None, create=False)
        for key in sorted(box.iterkeys()):
            try:
                raw = box.get_bytes(key)
            except OSError as exc:
                yield InboundMessage(b"", f"maildir:{path}/{key}", error=f"cannot read: {exc}")
                continue
            yield InboundMessage(raw, f"maildir:{path}/{key}")


def _is_mbox(path: Path) -> bool:
    try:
        with path.open("rb") as fh:
            return fh.read(5) == b"From "
    except OSError:
        return False


# -- IMAP ------------------------------------------------------------------------------------


class ImapSource(BounceSource):
    """UNSEEN messages of an IMAP mailbox, flagged ``\\Seen`` once recorded."""

    def __init__(
        self,
        url: str,
        *,
        password: str | None = None,
        ssl_context: ssl.SSLContext | None = None,
        timeout: float = 30.0,
    ) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("imap", "imaps") or not parts.hostname:
            raise ConfigError(f"not an IMAP URL: use imaps://user@host[:port]/MAILBOX, not {url!r}")
        if not parts.username:
            raise ConfigError("the IMAP URL needs a user name: imaps://user@host/INBOX")
        self.implicit_tls = parts.scheme == "imaps"
        self.host = parts.hostname
        self.port = parts.port or (993 if self.implicit_tls else 143)
        self.user = unquote(parts.username)
        self.mailbox = unquote(parts.path.lstrip("/")) or "INBOX"
        self._password = (
            password
            or (unquote(parts.password) if parts.password else None)
            or os.environ.get("MAILKIT_IMAP_PASSWORD")
        )
        if not self._password:
            raise ConfigError(
                "no IMAP password: put it in MAILKIT_IMAP_PASSWORD (or in the URL, "
                "imaps://user:password@host/INBOX, percent-encoded)"
            )
        self._ssl_context = ssl_context or _imap_ssl_context()
        self._timeout = timeout
        self._conn: imaplib.IMAP4 | None = None
        # The password never appears in the name used for reports, rejects and errors.
        self.name = f"{parts.scheme}://{self.user}@{self.host}:{self.port}/{self.mailbox}"

    def _connect(self) -> imaplib.IMAP4:
        try:
            conn: imaplib.IMAP4
            if self.implicit_tls:
                conn = imaplib.IMAP4_SSL(
                    self.host, self.port, ssl_context=self._ssl_context, timeout=self._timeout
                )
            else:
                conn = imaplib.IMAP4(self.host, self.port, timeout=self._timeout)
                conn.starttls(ssl_context=self._ssl_context)  # never log in in the clear
            conn.login(self.user, self._password or "")
            status, _ = conn.select(_quote(self.mailbox))
            if status != "OK":
                raise MailboxError(f"{self.name}: the mailbox cannot be selected; does it exist?")
        except imaplib.IMAP4.error as exc:
            raise MailboxError(
                f"{self.name}: the IMAP server refused: {_first_line(exc)}; check the user, "
                "the password and the mailbox name"
            ) from None
        except (OSError, ssl.SSLError) as exc:
            raise MailboxError(
                f"{self.name}: cannot connect: {exc.__class__.__name__}: {_first_line(exc)}"
            ) from None
        return conn

    def fetch_messages(self) -> Iterator[InboundMessage]:
        self._conn = conn = self._connect()
        try:
            status, data = conn.uid("SEARCH", "UNSEEN")
            if status != "OK":
                raise MailboxError(f"{self.name}: SEARCH UNSEEN failed")
            found = data[0].split() if data and isinstance(data[0], bytes) else []
            for uid in (u.decode("ascii") for u in found):
                status, parts = conn.uid("FETCH", uid, "(BODY.PEEK[])")
                raw = next(
                    (p[1] for p in parts if isinstance(p, tuple) and isinstance(p[1], bytes)),
                    None,
                )
                key = uid
                if status != "OK" or raw is None:
                    yield InboundMessage(
                        b"", f"{self.name}#uid{key}", key=key, error="FETCH returned nothing"
                    )
                    continue
                yield InboundMessage(raw, f"{self.name}#uid{key}", key=key)
        except (imaplib.IMAP4.error, OSError) as exc:
            raise MailboxError(f"{self.name}: reading failed: {_first_line(exc)}") from None

    def mark_done(self, message: InboundMessage) -> None:
        if self._conn is None or not message.key:
            return
        try:
            self._conn.uid("STORE", message.key, "+FLAGS", "(\\Seen)")
        except (imaplib.IMAP4.error, OSError) as exc:
            # Recorded already; unflagged it is read again next time and skipped as a duplicate.
            raise MailboxError(f"{self.name}: cannot flag a message seen: {exc}") from None

    def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is None:
            return
        try:
            conn.close()
            conn.logout()
        except (imaplib.IMAP4.error, OSError):
            pass  # the server went away: nothing left to release


def _quote(mailbox_name: str) -> str:
    escaped = mailbox_name.replace("\\", "\\\\").replace('"', '\\"')
    return f'"{escaped}"'


def _first_line(exc: BaseException) -> str:
    text = str(exc.args[0] if exc.args else exc)
    if text.startswith("b'") or text.startswith('b"'):
        text = text[2:-1]
    return text.splitlines()[0][:200] if text else exc.__class__.__name__


def _imap_ssl_context() -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    cafile = os.environ.get("MAILKIT_IMAP_CAFILE")
    if cafile:
        try:
            context.load_verify_locations(cafile=cafile)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(
                f"cannot load MAILKIT_IMAP_CAFILE={cafile!r}: {exc}; it must name a PEM file"
            ) from None
    return context


register_source("imap", ImapSource)
register_source("imaps", ImapSource)
