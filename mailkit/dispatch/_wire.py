"""Commands and replies on an open SMTP session, several in flight at once (RFC 2920).

aiosmtplib opens the session (connect, TLS, EHLO, STARTTLS, AUTH); ``Wire`` then takes over its
transport for the mail transactions. aiosmtplib's protocol reads one reply per command it
wrote and drops what arrives beyond it, so it cannot carry PIPELINING, which saves two of the
four round trips of every message (MAIL FROM, RCPT TO and DATA go out together) and as many
wake-ups of the event loop on both ends.

Errors keep aiosmtplib's types, so that the caller translates one family: a lost connection
raises ``SMTPServerDisconnected``, a reply that does not come in time ``SMTPReadTimeoutError``,
garbage instead of a reply ``SMTPResponseException`` (code -1, after closing the connection).
"""

from __future__ import annotations

import asyncio
from collections import deque
from typing import NamedTuple

from aiosmtplib import SMTPReadTimeoutError, SMTPResponseException, SMTPServerDisconnected

__all__ = ["Reply", "Wire"]

# RFC 5321 4.5.3.1.5 limits a reply line to 512 octets; allow generous multi-line replies, but
# not a server that streams without end.
_MAX_PENDING = 64 * 1024


class Reply(NamedTuple):
    """One complete server reply; ``message`` joins the lines of a multi-line reply by \\n."""

    code: int
    message: str


class Wire(asyncio.Protocol):
    """The protocol of one SMTP transport after the session was opened elsewhere.

    ``write`` sends raw command bytes; ``read_reply`` returns the replies in the order they
    came, however they were split or joined into packets; ``drain`` waits while the transport's
    write buffer is over its high-water mark.
    """

    def __init__(self, transport: asyncio.Transport) -> None:
        self._loop = asyncio.get_running_loop()
        self._transport = transport
        self._buffer = bytearray()
        self._lines: list[str] = []  # of a multi-line reply still arriving
        self._replies: deque[Reply] = deque()
        self._waiter: asyncio.Future[None] | None = None
        self._drain_waiter: asyncio.Future[None] | None = None
        self._paused = False
        self._lost: BaseException | None = None
        transport.set_protocol(self)

    # -- the caller's side -----------------------------------------------------------------

    @property
    def is_open(self) -> bool:
        return self._lost is None and not self._transport.is_closing()

    def write(self, data: bytes) -> None:
        if not self.is_open:
            raise self._disconnected()
        self._transport.write(data)

    async def drain(self) -> None:
        """Wait until the transport took the written data back under its high-water mark."""
        if self._paused and self._lost is None:
            waiter = self._loop.create_future()
            self._drain_waiter = waiter
            try:
                await waiter
            finally:
                self._drain_waiter = None
        if not self.is_open:
            raise self._disconnected()

    async def read_reply(self, timeout: float | None) -> Reply:
        """The next reply; raises when the connection ends first or ``timeout`` passes."""
        if not self._replies and self._lost is None:
            waiter = self._loop.create_future()
            self._waiter = waiter
            # One timer handle instead of asyncio.wait_for's task and callbacks: this runs
            # twice per message.
            timer = self._loop.call_later(timeout, _expire, waiter) if timeout is not None else None
            try:
                await waiter
            finally:
                self._waiter = None
                if timer is not None:
                    timer.cancel()
        if self._replies:
            return self._replies.popleft()
        raise self._disconnected()

    def close(self) -> None:
        self._transport.close()

    def abort(self) -> None:
        self._transport.abort()

    # -- asyncio's side --------------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        buffer = self._buffer
        buffer += data
        start = 0
        while (end := buffer.find(b"\n", start)) >= 0:
            line = bytes(buffer[start:end])
            start = end + 1
            code = line[:3]
            if not (code.isdigit() and line[3:4] in (b" ", b"-", b"\r", b"")):
                self._garbage(line)
                return
            self._lines.append(line[4:].strip(b" \t\r").decode("utf-8", "surrogateescape"))
            if line[3:4] != b"-":
                self._replies.append(Reply(int(code), "\n".join(self._lines)))
                self._lines.clear()
        del buffer[:start]
        if len(buffer) > _MAX_PENDING:
            self._garbage(bytes(buffer[:80]))
            return
        if self._replies:
            _wake(self._waiter)

    def eof_received(self) -> bool:
        return False  # close the transport: connection_lost follows

    def connection_lost(self, exc: Exception | None) -> None:
        if self._lost is None:  # else it is why we closed it
            self._lost = exc if exc is not None else SMTPServerDisconnected("Connection lost")
        _wake(self._waiter)
        _wake(self._drain_waiter)

    def pause_writing(self) -> None:
        self._paused = True

    def resume_writing(self) -> None:
        self._paused = False
        _wake(self._drain_waiter)

    # -- internals -------------------------------------------------------------------------

    def _disconnected(self) -> SMTPServerDisconnected:
        error = SMTPServerDisconnected("Connection lost")
        if isinstance(self._lost, SMTPResponseException):
            return SMTPServerDisconnected(f"Connection closed: {self._lost.message}")
        if self._lost is not None and not isinstance(self._lost, SMTPServerDisconnected):
            error.__cause__ = self._lost
        return error

    def _garbage(self, line: bytes) -> None:
        text = line.decode("utf-8", "replace")
        self._lost = SMTPResponseException(-1, f"malformed SMTP reply: {text!r}")
        self._transport.abort()
        _wake(self._waiter)


def _wake(waiter: asyncio.Future[None] | None) -> None:
    if waiter is not None and not waiter.done():
        waiter.set_result(None)


def _expire(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_exception(SMTPReadTimeoutError("Timed out waiting for server response"))
