"""An embedded SMTP server (aiosmtpd) that stores what it receives: for the demo, tests, dry runs.

``Sink`` runs aiosmtpd's threaded controller on a free port and keeps every accepted message in
a Maildir, an mbox or (when neither is given) in memory. A ``FaultPlan`` makes it misbehave on
purpose, the way real servers do: refuse some recipients at RCPT TO (always, or the first N
times), refuse a message at the end of DATA, drop the connection in the middle of the data or
after it arrived, stall at RCPT or before the final reply, greet with 421 (every connection or
the first few), or close after N messages. ``serve_sink`` runs one in the foreground for
``mailkit sink``.

    with Sink(maildir="out/") as sink:
        send_campaign(..., smtp_url=sink.url)
        assert sink.count == 120
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import email
import email.policy
import hmac
import logging
import mailbox
import os
import signal
import ssl
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field
from email.message import EmailMessage
from types import FrameType, MappingProxyType
from typing import Any

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, AuthResult, LoginPassword, Session

from .errors import ConfigError

__all__ = ["FaultPlan", "Received", "Sink", "serve_sink"]

log = logging.getLogger(__name__)

SERVER_HOSTNAME = "mailkit-sink"
DEFAULT_MAX_MESSAGE_SIZE = 64 * 1024 * 1024
_ACCEPTED = "250 2.0.0 OK"


def _check_reply(reply: str) -> str:
    """``reply`` if it is a well-formed SMTP reply line, else ConfigError."""
    code = reply[:3]
    if not (code.isdigit() and "200" <= code <= "599" and reply[3:4] in ("", " ")):
        raise ConfigError(
            f"bad SMTP reply {reply!r}: give the full reply with a 3-digit code, "
            "e.g. '550 5.1.1 <x@example.com>: user unknown'"
        )
    return reply


def _lower_keys(replies: Mapping[str, str]) -> Mapping[str, str]:
    return MappingProxyType({addr.lower(): _check_reply(r) for addr, r in replies.items()})


def _lower_set(addresses: Iterable[str]) -> frozenset[str]:
    return frozenset(a.lower() for a in addresses)


@dataclass(frozen=True)
class FaultPlan:
    """Server-side fault injection. Recipient addresses match case-insensitively.

    ``rcpt_replies``       recipient → full reply given at RCPT TO instead of 250 (refused)
    ``data_replies``       recipient → full reply given at the end of DATA (not stored unless 2xx)
    ``drop_after_data``    recipients whose message is stored, then the connection closes with no
                           reply: the client cannot know whether it was delivered
    ``stall_at_rcpt``      recipients whose RCPT TO is never answered (until the client gives up)
    ``greeting_reply``     given instead of the 220 greeting, then the connection closes
                           (e.g. ``"421 4.3.2 too busy"``)
    ``messages_per_connection``  after this many accepted messages on one connection, the next
                           MAIL FROM gets ``421 4.7.0`` and the connection closes
    ``greeting_replies``   per connection, in the order they arrive: the i-th connection gets
                           ``greeting_replies[i]`` (when not None) instead of the 220 greeting and
                           is closed; later connections fall back to ``greeting_reply``
    ``rcpt_reply_times``   recipient → how many times its ``rcpt_replies`` entry is given; after
                           that the recipient is accepted (a temporary failure that clears)
    ``drop_mid_data``      recipients whose data is cut: after 354 the sink reads the first bytes
                           and resets the connection; nothing is stored
    ``stall_at_data_end``  recipients whose message is stored but never answered: the client
                           waits for the final reply until it gives up
    ``data_delay``         seconds every end of DATA waits before its reply (a slow relay)
    """

    rcpt_replies: Mapping[str, str] = field(default_factory=dict)
    data_replies: Mapping[str, str] = field(default_factory=dict)
    drop_after_data: AbstractSet[str] = frozenset()
    stall_at_rcpt: AbstractSet[str] = frozenset()
    greeting_reply: str | None = None
    messages_per_connection: int | None = None
    greeting_replies: tuple[str | None, ...] = ()
    rcpt_reply_times: Mapping[str, int] = field(default_factory=dict)
    drop_mid_data: AbstractSet[str] = frozenset()
    stall_at_data_end: AbstractSet[str] = frozenset()
    data_delay: float = 0.0

    def __post_init__(self) -> None:
        # Normalised once here so the server's hot path only does dict lookups.
        object.__setattr__(self, "rcpt_replies", _lower_keys(self.rcpt_replies))
        object.__setattr__(self, "data_replies", _lower_keys(self.data_replies))
        object.__setattr__(self, "drop_after_data", _lower_set(self.drop_after_data))
        object.__setattr__(self, "stall_at_rcpt", _lower_set(self.stall_at_rcpt))
        object.__setattr__(self, "drop_mid_data", _lower_set(self.drop_mid_data))
        object.__setattr__(self, "stall_at_data_end", _lower_set(self.stall_at_data_end))
        object.__setattr__(
            self,
            "rcpt_reply_times",
            MappingProxyType({k.lower(): int(v) for k, v in self.rcpt_reply_times.items()}),
        )
        object.__setattr__(self, "greeting_replies", tuple(self.greeting_replies))
        for reply in (self.greeting_reply, *self.greeting_replies):
            if reply is not None:
                _check_reply(reply)
        if self.messages_per_connection is not None and self.messages_per_connection < 1:
            raise ConfigError("messages_per_connection must be at least 1")
        if self.data_delay < 0:
            raise ConfigError("data_delay must not be negative")

    def merged(self, rcpt_replies: Mapping[str, str]) -> FaultPlan:
        """This plan with more RCPT replies (those given here win)."""
        combined = {**self.rcpt_replies, **{k.lower(): v for k, v in rcpt_replies.items()}}
        return dataclasses.replace(self, rcpt_replies=combined)

    def greeting_for(self, index: int) -> str | None:
        """The fault greeting of the ``index``-th connection (0-based), or None for 220."""
        if index < len(self.greeting_replies) and self.greeting_replies[index] is not None:
            return self.greeting_replies[index]
        return self.greeting_reply


@dataclass(frozen=True)
class Received:
    """One accepted message: the SMTP envelope and the message bytes (CRLF line endings).

    With a Maildir or mbox the bytes are read back from it; an mbox quotes body lines that
    start with ``From `` (``>From ``), as mbox files do.
    """

    mail_from: str
    rcpt_tos: tuple[str, ...]
    data: bytes


@dataclass(frozen=True)
class _Record:
    mail_from: str
    rcpt_tos: tuple[str, ...]
    key: str | None  # key in the mailbox, or None when kept in memory
    data: bytes | None


class _Store:
    """Where accepted messages go; every method is called under the Sink's lock.

    A Maildir needs no open file; an mbox is kept open (and locked per write) while the Sink
    runs, and opened briefly for reading after it stopped.
    """

    def __init__(
        self, maildir: str | os.PathLike[str] | None, mbox: str | os.PathLike[str] | None
    ) -> None:
        if maildir is not None and mbox is not None:
            raise ConfigError("give a Sink either maildir= or mbox=, not both")
        self.maildir = mailbox.Maildir(os.fspath(maildir), create=True) if maildir else None
        self.mbox_path = os.fspath(mbox) if mbox is not None else None
        self.mbox: mailbox.mbox | None = None
        self.records: list[_Record] = []
        if self.mbox_path is not None:
            mailbox.mbox(self.mbox_path, create=True).close()  # fail now on a bad path

    def open(self) -> None:
        if self.mbox_path is not None and self.mbox is None:
            self.mbox = mailbox.mbox(self.mbox_path, create=True)

    def close(self) -> None:
        if self.mbox is not None:
            self.mbox.close()
            self.mbox = None

    def add(self, mail_from: str, rcpt_tos: tuple[str, ...], data: bytes) -> None:
        # Mailbox files conventionally use the local line ending, not the wire's CRLF.
        stored = data.replace(b"\r\n", b"\n")
        if self.maildir is not None:
            key = self.maildir.add(stored)
        elif self.mbox is not None:
            stamp = time.asctime(time.gmtime())
            from_line = f"From {mail_from or 'MAILER-DAEMON'} {stamp}\n".encode()
            self.mbox.lock()
            try:
                key = str(self.mbox.add(from_line + stored))
                self.mbox.flush()
            finally:
                self.mbox.unlock()
        else:
            self.records.append(_Record(mail_from, rcpt_tos, None, data))
            return
        self.records.append(_Record(mail_from, rcpt_tos, key, None))

    def read_all(self) -> list[Received]:
        box: mailbox.Mailbox[Any] | None = self.maildir or self.mbox
        temporary = box is None and self.mbox_path is not None
        if temporary:
            assert self.mbox_path is not None
            box = mailbox.mbox(self.mbox_path, create=False)
        try:
            out = []
            for r in self.records:
                if r.data is not None:
                    data = r.data
                else:
                    assert box is not None and r.key is not None
                    key: Any = r.key if self.maildir is not None else int(r.key)
                    data = box.get_bytes(key).replace(b"\n", b"\r\n")
                out.append(Received(r.mail_from, r.rcpt_tos, data))
            return out
        finally:
            if temporary and box is not None:
                box.close()


class _Handler:
    """aiosmtpd hooks: envelope checks, fault injection and storage (runs in the sink's loop)."""

    def __init__(
        self, sink: Sink, plan: FaultPlan, auth: tuple[str, str] | None, pipelining: bool
    ) -> None:
        self.sink = sink
        self.plan = plan
        self.auth = auth
        self.pipelining = pipelining

    async def handle_EHLO(
        self, server: Any, session: Any, envelope: Any, hostname: str, responses: list[str]
    ) -> list[str]:
        session.host_name = hostname  # aiosmtpd leaves this to a handler that has the hook
        if self.pipelining:
            # aiosmtpd reads commands one by one from its stream buffer and answers them in
            # order, which is all RFC 2920 asks of a server; it just does not say so.
            responses.insert(len(responses) - 1, "250-PIPELINING")
        return responses

    async def handle_MAIL(
        self, server: Any, session: Any, envelope: Any, address: str, mail_options: list[str]
    ) -> str:
        if self.auth is not None and not session.authenticated:
            return "530 5.7.0 Authentication required"
        limit = self.plan.messages_per_connection
        if limit is not None and getattr(session, "mailkit_accepted", 0) >= limit:
            server.loop.call_soon(server.transport.close)
            return "421 4.7.0 mailkit-sink: too many messages on this connection"
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return "250 2.1.0 OK"

    async def handle_RCPT(
        self, server: Any, session: Any, envelope: Any, address: str, rcpt_options: list[str]
    ) -> str:
        key = address.lower()
        if key in self.plan.stall_at_rcpt:
            self.sink._note_stall(+1)
            try:
                # Never answered; the connection's end (client timeout, sink stop) cancels this.
                await asyncio.Event().wait()
            finally:
                self.sink._note_stall(-1)
        reply = self.plan.rcpt_replies.get(key)
        if reply is not None and self.sink._use_rcpt_fault(key, self.plan.rcpt_reply_times):
            return reply
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(rcpt_options)
        return "250 2.1.5 OK"

    async def handle_exception(self, error: Exception) -> str:
        # A client failing its TLS handshake is the client's problem (and a test's subject);
        # without this hook aiosmtpd logs a full traceback for it.
        log.debug("sink session error: %r", error)
        return f"500 5.0.0 Error: ({error.__class__.__name__}) {error}"

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        rcpts = tuple(str(r) for r in envelope.rcpt_tos)
        reply = next(
            (
                self.plan.data_replies[r.lower()]
                for r in rcpts
                if r.lower() in self.plan.data_replies
            ),
            _ACCEPTED,
        )
        if self.plan.data_delay > 0:
            await asyncio.sleep(self.plan.data_delay)
        if not reply.startswith("2"):
            return reply
        self.sink._store_message(str(envelope.mail_from or ""), rcpts, envelope.original_content)
        session.mailkit_accepted = getattr(session, "mailkit_accepted", 0) + 1
        if any(r.lower() in self.plan.stall_at_data_end for r in rcpts):
            self.sink._note_stall(+1)
            try:
                await asyncio.Event().wait()  # the client's timeout or the sink's stop ends it
            finally:
                self.sink._note_stall(-1)
        if any(r.lower() in self.plan.drop_after_data for r in rcpts):
            server.transport.abort()
            await asyncio.Event().wait()  # connection_lost cancels us; no reply is ever sent
        return reply


class _QuietSession(Session):
    """aiosmtpd sets the deprecated ``login_data`` on every AUTH and logs a warning each time."""

    @property
    def login_data(self) -> Any:
        return self._login_data

    @login_data.setter
    def login_data(self, value: Any) -> None:
        self._login_data = value


class _SinkSMTP(SMTP):
    """aiosmtpd's SMTP plus a greeting fault and a registry of live sessions for stop()."""

    def __init__(self, handler: Any, *, sink: Sink, plan: FaultPlan, **kw: Any):
        super().__init__(handler, **kw)
        self._sink = sink
        self._plan = plan
        self._greeting_reply: str | None = None
        self._greeted = False

    def _create_session(self) -> Session:
        return _QuietSession(self.loop)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._greeting_reply = self._plan.greeting_for(self._sink._count_connection())
        super().connection_made(transport)
        self._sink._sessions.add(self)

    async def smtp_DATA(self, arg: str) -> None:
        envelope = self.envelope
        rcpts = [str(r).lower() for r in (envelope.rcpt_tos if envelope is not None else [])]
        if arg or not any(r in self._plan.drop_mid_data for r in rcpts):
            await super().smtp_DATA(arg)
            return
        await self.push("354 End data with <CR><LF>.<CR><LF>")
        with contextlib.suppress(Exception):
            await self._reader.read(1024)  # some of the data, never the end of it
        if isinstance(self.transport, asyncio.Transport):
            self.transport.abort()  # a reset: whatever the client still sends is refused

    def connection_lost(self, error: Exception | None) -> None:
        self._sink._sessions.discard(self)
        super().connection_lost(error)

    async def push(self, status: Any) -> None:
        if not self._greeted:
            self._greeted = True
            if self._greeting_reply is not None:
                await super().push(self._greeting_reply)
                if self.transport is not None:
                    self.loop.call_soon(self.transport.close)
                return
        await super().push(status)


class _SinkController(Controller):
    """aiosmtpd 1.4's Controller needs a concrete port; this one binds port 0 race-free."""

    def __init__(self, handler: Any, *, sink: Sink, plan: FaultPlan, **kw: Any):
        super().__init__(handler, **kw)
        self._sink = sink
        self._plan = plan

    def factory(self) -> _SinkSMTP:
        return _SinkSMTP(self.handler, sink=self._sink, plan=self._plan, **self.SMTP_kwargs)

    def _run(self, ready_event: threading.Event) -> None:
        try:
            super()._run(ready_event)
        finally:
            if self._thread_exception is not None:
                ready_event.set()  # fail fast: aiosmtpd would wait out ready_timeout first

    def _trigger_server(self) -> None:
        if self._thread_exception is not None:
            raise self._thread_exception
        super()._trigger_server()  # type: ignore[no-untyped-call]

    def _create_server(self) -> Any:
        return self._bind()

    async def _bind(self) -> asyncio.AbstractServer:
        # The kernel picks the port while binding, so no other process can take it in between;
        # the real port is then what _trigger_server() and Sink.port use.
        server = await self.loop.create_server(
            self._factory_invoker, host=self.hostname, port=self.port, ssl=self.ssl_context
        )
        ports = {sock.getsockname()[1] for sock in server.sockets}
        if len(ports) > 1:  # e.g. "localhost" bound on IPv4 and IPv6 with two free ports
            port = min(ports)
            server.close()
            await server.wait_closed()
            server = await self.loop.create_server(
                self._factory_invoker, host=self.hostname, port=port, ssl=self.ssl_context
            )
        self.port = server.sockets[0].getsockname()[1]
        return server


class Sink:
    """An SMTP server on ``host:port`` (port 0: a free one) that keeps what it accepts.

    ``maildir`` / ``mbox``  store accepted messages there (created if missing); else in memory.
    ``rcpt_replies``        recipient → full reply at RCPT TO, e.g. ``"550 5.1.1 user unknown"``
    ``faults``              a ``FaultPlan`` for other misbehaviour (``rcpt_replies`` merge into it)
    ``tls_context``         a server-side SSLContext: with ``starttls=True`` STARTTLS is offered
                            and required; otherwise the whole connection is TLS (smtps)
    ``auth``                (user, password): AUTH PLAIN/LOGIN with these is required before MAIL
    ``max_message_size``    advertised SIZE limit in bytes (None: unlimited)
    ``idle_timeout``        seconds of client silence after which the server hangs up
    ``pipelining``          offer PIPELINING (RFC 2920); False acts as a server that does not
    """

    def __init__(
        self,
        *,
        maildir: str | os.PathLike[str] | None = None,
        mbox: str | os.PathLike[str] | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
        rcpt_replies: Mapping[str, str] | None = None,
        faults: FaultPlan | None = None,
        tls_context: ssl.SSLContext | None = None,
        starttls: bool = False,
        auth: tuple[str, str] | None = None,
        max_message_size: int | None = DEFAULT_MAX_MESSAGE_SIZE,
        idle_timeout: float = 300.0,
        ready_timeout: float = 10.0,
        pipelining: bool = True,
    ) -> None:
        if starttls and tls_context is None:
            raise ConfigError("Sink(starttls=True) needs a tls_context with the server cert")
        self.host = host
        self._requested_port = port
        self._plan = (faults or FaultPlan()).merged(rcpt_replies or {})
        self._tls_context = tls_context
        self._starttls = starttls
        self._auth = auth
        self._max_message_size = max_message_size
        self._idle_timeout = idle_timeout
        self._pipelining = pipelining
        self._ready_timeout = ready_timeout
        self._store = _Store(maildir, mbox)
        self._lock = threading.Lock()
        self._sessions: set[_SinkSMTP] = set()  # touched only from the server's loop thread
        self._stalled = 0
        self._connections = 0
        self._rcpt_faults_used: dict[str, int] = {}
        self._controller: _SinkController | None = None

    # -- lifecycle -------------------------------------------------------------------------

    def start(self) -> Sink:
        """Start serving in a background thread; returns self."""
        if self._controller is not None:
            raise RuntimeError("this Sink is already running")
        smtp_kwargs: dict[str, Any] = {
            "ident": "mailkit sink",
            "enable_SMTPUTF8": True,
            "decode_data": False,
            "data_size_limit": self._max_message_size,
            "timeout": self._idle_timeout,
            # AUTH is enforced in handle_MAIL; aiosmtpd's own auth_required would also refuse
            # AUTH over implicit TLS (it only counts STARTTLS as encryption).
            "auth_require_tls": False,
        }
        if self._auth is not None:
            smtp_kwargs["authenticator"] = self._authenticate
        ssl_context = None
        if self._tls_context is not None and self._starttls:
            smtp_kwargs["tls_context"] = self._tls_context
            smtp_kwargs["require_starttls"] = True
        elif self._tls_context is not None:
            ssl_context = self._tls_context
        controller = _SinkController(
            _Handler(self, self._plan, self._auth, self._pipelining),
            sink=self,
            plan=self._plan,
            hostname=self.host,
            port=self._requested_port,
            ssl_context=ssl_context,
            server_hostname=SERVER_HOSTNAME,
            ready_timeout=self._ready_timeout,
            **smtp_kwargs,
        )
        try:
            controller.start()
        except OSError as exc:
            if controller._thread is not None:
                controller._thread.join()
            controller.loop.close()
            raise ConfigError(
                f"the sink cannot listen on {self.host}:{self._requested_port}: {exc}; "
                "choose another port (0 picks a free one)"
            ) from exc
        with self._lock:
            self._store.open()
            # The controller's own readiness probe was connection 0; clients count from here.
            self._connections = 0
        self._controller = controller
        return self

    def stop(self) -> None:
        """Close every client connection and stop the server (idempotent)."""
        controller, self._controller = self._controller, None
        if controller is None:
            return
        # aiosmtpd's stop() leaves accepted connections open on a dead loop; clients would
        # hang until their timeout instead of seeing the server go away.
        with contextlib.suppress(RuntimeError, TimeoutError):
            asyncio.run_coroutine_threadsafe(self._drop_sessions(), controller.loop).result(10)
        controller.stop()
        with self._lock:
            self._store.close()

    async def _drop_sessions(self) -> None:
        for session in list(self._sessions):
            if isinstance(session.transport, asyncio.Transport):
                session.transport.abort()
        await asyncio.sleep(0)  # let the connection_lost callbacks run

    def __enter__(self) -> Sink:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # -- where it listens ----------------------------------------------------------------

    @property
    def port(self) -> int:
        """The port listened on (the real one once started, when 0 was asked)."""
        if self._controller is not None:
            return int(self._controller.port)
        return self._requested_port

    @property
    def url(self) -> str:
        """An SMTP URL for mailkit's transport: smtp://, smtps:// or smtp+starttls://."""
        scheme = "smtp"
        if self._tls_context is not None:
            scheme = "smtp+starttls" if self._starttls else "smtps"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{scheme}://{host}:{self.port}"

    # -- what it received ----------------------------------------------------------------

    @property
    def count(self) -> int:
        """How many messages were accepted so far."""
        with self._lock:
            return len(self._store.records)

    @property
    def stalled(self) -> int:
        """How many commands are being stalled right now by ``FaultPlan.stall_at_rcpt``."""
        with self._lock:
            return self._stalled

    def envelopes(self) -> list[Received]:
        """Every accepted message with its envelope, in arrival order."""
        with self._lock:
            return self._store.read_all()

    def messages(self) -> list[EmailMessage]:
        """Every accepted message parsed (``email.policy.default``), in arrival order."""
        return [
            email.message_from_bytes(r.data, policy=email.policy.default) for r in self.envelopes()
        ]

    # -- called from the server's thread -----------------------------------------------

    def _store_message(self, mail_from: str, rcpt_tos: tuple[str, ...], data: bytes) -> None:
        with self._lock:
            self._store.add(mail_from, rcpt_tos, data)

    def _count_connection(self) -> int:
        """The 0-based index of a new connection."""
        with self._lock:
            index = self._connections
            self._connections += 1
            return index

    def _use_rcpt_fault(self, key: str, limits: Mapping[str, int]) -> bool:
        """Whether the RCPT fault for ``key`` applies this time (and count it)."""
        with self._lock:
            used = self._rcpt_faults_used.get(key, 0)
            if key in limits and used >= limits[key]:
                return False
            self._rcpt_faults_used[key] = used + 1
            return True

    @property
    def connections(self) -> int:
        """How many connections the sink accepted so far."""
        with self._lock:
            return self._connections

    def _note_stall(self, delta: int) -> None:
        with self._lock:
            self._stalled += delta

    def _authenticate(
        self, server: Any, session: Any, envelope: Any, mechanism: str, auth_data: Any
    ) -> AuthResult:
        assert self._auth is not None
        if not isinstance(auth_data, LoginPassword):
            return AuthResult(success=False, handled=False)
        user, password = self._auth
        ok = hmac.compare_digest(auth_data.login, user.encode()) & hmac.compare_digest(
            auth_data.password, password.encode()
        )
        return AuthResult(success=bool(ok), handled=False, auth_data=auth_data)


def serve_sink(
    *,
    host: str = "127.0.0.1",
    port: int = 2525,
    maildir: str | os.PathLike[str] | None = None,
    mbox: str | os.PathLike[str] | None = None,
    on_ready: Callable[[Sink], None] | None = None,
) -> None:
    """Run a Sink in the foreground until Ctrl-C or SIGTERM (``mailkit sink``)."""
    done = threading.Event()
    previous: Any = None
    in_main_thread = threading.current_thread() is threading.main_thread()

    def on_sigterm(signum: int, frame: FrameType | None) -> None:
        done.set()

    if in_main_thread:
        previous = signal.signal(signal.SIGTERM, on_sigterm)
    try:
        with Sink(host=host, port=port, maildir=maildir, mbox=mbox) as sink:
            if on_ready is not None:
                on_ready(sink)
            with contextlib.suppress(KeyboardInterrupt):
                done.wait()
    finally:
        if in_main_thread:
            signal.signal(signal.SIGTERM, previous)
