"""An inbound SMTP listener for a relay that forwards bounces (``mailkit serve --bounce-smtp``).

Every message the relay hands over goes through the same parser and policy as files and
mailboxes; the SMTP envelope recipients are tried first for the VERP address. The listener
answers ``250`` only after the message is recorded (also when it was kept aside as
unparseable), and ``451`` when the database cannot take it, so the relay keeps it and retries:
no accepted bounce is lost. It has no authentication: bind it to loopback (the default) or to
an address only the relay can reach.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from aiosmtpd.controller import Controller
from sqlalchemy import Engine
from sqlalchemy.exc import SQLAlchemyError

from ..errors import ConfigError, MailkitError
from ..tracking.tokens import Keyring, load_keyring
from .ingest import IngestReport, ingest_message
from .policy import BouncePolicy
from .sources import InboundMessage

__all__ = ["BounceListener", "run_bounce_listener", "serve_bounce_listener"]

log = logging.getLogger(__name__)

#: Bounces carry the original back; anything larger than this is refused at DATA.
MAX_BOUNCE_SIZE = 20 * 1024 * 1024


class _Handler:
    def __init__(self, listener: BounceListener) -> None:
        self.listener = listener

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        raw = envelope.original_content or envelope.content
        if isinstance(raw, str):
            raw = raw.encode("utf-8", "surrogateescape")
        peer = session.peer[0] if isinstance(session.peer, tuple) else str(session.peer)
        message = InboundMessage(
            raw=bytes(raw), source=f"smtp:{peer}", envelope_rcpts=tuple(envelope.rcpt_tos)
        )
        loop = asyncio.get_running_loop()
        try:
            report = await loop.run_in_executor(None, self.listener.ingest, message)
        except (MailkitError, SQLAlchemyError) as exc:
            log.warning("bounce from %s not stored (%s): asking the relay to retry", peer, exc)
            return "451 4.3.0 the bounce cannot be stored now; try again later"
        self.listener.note(report)
        return "250 2.0.0 bounce recorded"


class _Controller(Controller):
    """Binds port 0 race-free (aiosmtpd 1.4's Controller wants a concrete port)."""

    def _create_server(self) -> Any:
        return self._bind()

    async def _bind(self) -> asyncio.AbstractServer:
        server = await self.loop.create_server(
            self._factory_invoker, host=self.hostname, port=self.port
        )
        self.port = server.sockets[0].getsockname()[1]
        return server

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


class BounceListener:
    """An SMTP server on ``host:port`` (0: a free port) that ingests every message it receives.

    Use as a context manager, or ``start()`` / ``stop()``. ``report`` sums what it ingested.
    """

    def __init__(
        self,
        db: Engine,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        keyring: Keyring | None = None,
        policy: BouncePolicy | None = None,
    ) -> None:
        self.db = db
        self.host = host
        self._requested_port = port
        self.keyring = keyring or load_keyring(db.url.render_as_string(hide_password=False))
        self.policy = policy or BouncePolicy()
        self._lock = threading.Lock()
        self._report = IngestReport()
        self._controller: _Controller | None = None

    def ingest(self, message: InboundMessage) -> IngestReport:
        return ingest_message(self.db, message, keyring=self.keyring, policy=self.policy)

    def note(self, report: IngestReport) -> None:
        with self._lock:
            self._report += report

    @property
    def report(self) -> IngestReport:
        """Everything ingested since start."""
        with self._lock:
            return self._report

    def start(self) -> BounceListener:
        if self._controller is not None:
            raise RuntimeError("this BounceListener is already running")
        controller = _Controller(
            _Handler(self),
            hostname=self.host,
            port=self._requested_port,
            ident="mailkit bounces",
            decode_data=False,
            enable_SMTPUTF8=True,
            data_size_limit=MAX_BOUNCE_SIZE,
            server_hostname="mailkit-bounces",
        )
        try:
            controller.start()
        except OSError as exc:
            if controller._thread is not None:
                controller._thread.join()
            controller.loop.close()
            raise ConfigError(
                f"the bounce listener cannot listen on {self.host}:{self._requested_port}: "
                f"{exc.strerror or exc}; choose another port"
            ) from exc
        self._controller = controller
        return self

    def stop(self) -> None:
        """Stop listening (idempotent); messages already answered 250 are recorded."""
        controller, self._controller = self._controller, None
        if controller is not None:
            controller.stop()

    def __enter__(self) -> BounceListener:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    @property
    def port(self) -> int:
        """The port listened on (the real one once started)."""
        if self._controller is not None:
            return int(self._controller.port)
        return self._requested_port


def serve_bounce_listener(
    db: Engine,
    port: int,
    *,
    host: str = "127.0.0.1",
    keyring: Keyring | None = None,
    policy: BouncePolicy | None = None,
) -> BounceListener:
    """Start a ``BounceListener`` in a background thread and return it (call ``stop()``)."""
    return BounceListener(db, host=host, port=port, keyring=keyring, policy=policy).start()


@asynccontextmanager
async def run_bounce_listener(
    db: Engine,
    port: int,
    *,
    host: str = "127.0.0.1",
    keyring: Keyring | None = None,
    policy: BouncePolicy | None = None,
) -> AsyncIterator[BounceListener]:
    """A ``BounceListener`` as an async context manager (a companion of ``mailkit serve``).

    It runs in its own thread and event loop, so a slow database never stalls the caller's
    loop. Leaving stops it; a message cut off mid-transfer was never answered 250, so the
    relay sends it again (and a repeat is recognised by its hash).
    """
    listener = BounceListener(db, host=host, port=port, keyring=keyring, policy=policy)
    await asyncio.to_thread(listener.start)
    try:
        yield listener
    finally:
        await asyncio.to_thread(listener.stop)
