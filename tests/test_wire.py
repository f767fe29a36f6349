"""PIPELINING (RFC 2920): MAIL, RCPT and DATA in one write, replies however the server sends them.

The sink offers PIPELINING (``Sink(pipelining=False)`` acts as a server that does not); a small
scripted server stands in for the odd ones: replies joined into one packet, split byte by
byte, a DATA accepted after its only recipient was refused, garbage instead of a reply.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

import pytest

from mailkit._aio import run_sync
from mailkit.dispatch.transport import Outcome, SMTPConnection
from mailkit.sink import FaultPlan, Sink

# Every test here runs on uvloop and on asyncio's own loop.
pytestmark = pytest.mark.usefixtures("each_event_loop")

SENDER = "bounces@news.example.com"


def message(to: str) -> bytes:
    return f"From: news@example.com\r\nTo: {to}\r\nSubject: {to}\r\n\r\nhi {to}\r\n".encode()


async def send_each(url: str, recipients: list[str]) -> tuple[bool, list[Outcome]]:
    async with SMTPConnection(url) as conn:
        outcomes = [await conn.send(SENDER, r, message(r)) for r in recipients]
        return conn.pipelining, outcomes


@pytest.mark.parametrize("pipelining", [True, False])
def test_outcomes_do_not_depend_on_pipelining(pipelining: bool) -> None:
    plan = FaultPlan(
        rcpt_replies={
            "gone@example.com": "550 5.1.1 <gone@example.com>: user unknown",
            "full@example.com": "452 4.2.2 mailbox full",
            "spam@example.com": "550 5.7.26 unauthenticated mail is prohibited",
        },
        data_replies={"virus@example.com": "554 5.6.0 message refused"},
    )
    recipients = [
        "a@example.com",
        "gone@example.com",
        "b@example.com",
        "full@example.com",
        "virus@example.com",
        "spam@example.com",
        "c@example.com",
    ]
    with Sink(faults=plan, pipelining=pipelining) as sink:
        offered, outcomes = run_sync(send_each(sink.url, recipients))
        assert offered is pipelining
        assert [(o.kind, o.stage) for o in outcomes] == [
            ("sent", "data_end"),
            ("bounce", "rcpt"),
            ("sent", "data_end"),
            ("defer", "rcpt"),
            ("fail", "data_end"),
            ("stop", "rcpt"),
            ("sent", "data_end"),
        ]
        # Every refusal was cleaned up on the same connection: one session carried them all.
        assert sink.connections == 1
        assert sorted(e.rcpt_tos[0] for e in sink.envelopes()) == [
            "a@example.com",
            "b@example.com",
            "c@example.com",
        ]


@pytest.mark.parametrize("pipelining", [True, False])
def test_a_421_at_mail_reconnects_once_without_losing_the_message(pipelining: bool) -> None:
    with Sink(faults=FaultPlan(messages_per_connection=2), pipelining=pipelining) as sink:
        recipients = [f"r{i}@example.com" for i in range(5)]
        _, outcomes = run_sync(send_each(sink.url, recipients))
        assert [o.kind for o in outcomes] == ["sent"] * 5
        assert sorted(e.rcpt_tos[0] for e in sink.envelopes()) == sorted(recipients)
        assert sink.connections == 3


# -- a scripted server ----------------------------------------------------------------------------


@dataclass
class Scripted:
    """An SMTP server whose reply habits a test chooses (server-side fault injection).

    ``batch``         hold the replies to MAIL and RCPT and send them with DATA's, in one write
    ``byte_by_byte``  send every reply one byte per write, with a loop turn in between
    ``data_anyway``   answer DATA with 354 even when no recipient was accepted
    ``garbage``       answer MAIL with a line that is no SMTP reply
    ``data_250``      answer DATA with 250 instead of 354 (and take no data)
    """

    batch: bool = False
    byte_by_byte: bool = False
    data_anyway: bool = False
    garbage: bool = False
    data_250: bool = False
    commands: list[str] = field(default_factory=list)
    delivered: list[tuple[str, bytes]] = field(default_factory=list)
    sessions: list[asyncio.Task[None]] = field(default_factory=list)

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self.sessions.append(task)
        held: list[bytes] = []

        async def say(*lines: str) -> None:
            data = b"".join(line.encode() + b"\r\n" for line in lines)
            if self.byte_by_byte:
                for byte in data:
                    writer.write(bytes([byte]))
                    await writer.drain()
                    await asyncio.sleep(0)
            else:
                writer.write(data)
                await writer.drain()

        async def answer(line: str, hold: bool = False) -> None:
            if hold and self.batch:
                held.append(line.encode())
                return
            lines = [h.decode() for h in held] + [line]
            held.clear()
            await say(*lines)

        await say("220 scripted ESMTP")
        rcpts: list[str] = []
        try:
            while raw := await reader.readline():
                command = raw.decode().strip()
                self.commands.append(command)
                verb = command.split(":")[0].split(" ")[0].upper()
                if verb == "EHLO":
                    await say("250-scripted", "250-PIPELINING", "250-8BITMIME", "250 SIZE 100000")
                elif verb == "MAIL":
                    rcpts.clear()
                    await answer("hello? 250 OK" if self.garbage else "250 2.1.0 OK", hold=True)
                elif verb == "RCPT":
                    address = command.partition("<")[2].rstrip(">")
                    if address.startswith("refused"):
                        await answer("550 5.1.1 no such user", hold=True)
                    else:
                        rcpts.append(address)
                        await answer("250 2.1.5 OK", hold=True)
                elif verb == "DATA":
                    if self.data_250:
                        await answer("250 2.0.0 OK")
                        continue
                    if not rcpts and not self.data_anyway:
                        await answer("554 5.5.1 no valid recipients")
                        continue
                    await answer("354 go ahead")
                    body = b""
                    while (line := await reader.readline()) not in (b".\r\n", b""):
                        body += line
                    if rcpts:
                        self.delivered.append((rcpts[0], body))
                        await say("250 2.0.0 queued")
                    else:
                        await say("554 5.5.1 no valid recipients")
                elif verb == "RSET":
                    rcpts.clear()
                    await say("250 2.0.0 OK")
                elif verb == "QUIT":
                    await say("221 2.0.0 bye")
                    break
                else:
                    await say("502 5.5.2 not implemented")
        finally:
            writer.close()


async def run_scripted(server: Scripted, recipients: list[str]) -> list[Outcome]:
    listener = await asyncio.start_server(server.handle, "127.0.0.1", 0)
    port = listener.sockets[0].getsockname()[1]
    try:
        async with SMTPConnection(f"smtp://127.0.0.1:{port}?timeout=5") as conn:
            assert conn.pipelining
            return [await conn.send(SENDER, r, message(r)) for r in recipients]
    finally:
        listener.close()
        await listener.wait_closed()
        # The client closed its end: let the session see that before the loop goes away.
        await asyncio.wait(server.sessions, timeout=5)


@pytest.mark.parametrize(("batch", "byte_by_byte"), [(True, False), (False, True), (True, True)])
def test_replies_joined_or_split_are_read_in_order(batch: bool, byte_by_byte: bool) -> None:
    server = Scripted(batch=batch, byte_by_byte=byte_by_byte)
    recipients = ["a@example.com", "refused@example.com", "b@example.com"]
    outcomes = run_sync(run_scripted(server, recipients))
    assert [o.kind for o in outcomes] == ["sent", "bounce", "sent"]
    assert outcomes[1].reply == "550 5.1.1 no such user"
    assert [to for to, _ in server.delivered] == ["a@example.com", "b@example.com"]
    # MAIL, RCPT and DATA went out together; the refused one was followed by RSET.
    verbs = [c.split(":")[0].split(" ")[0] for c in server.commands]
    assert verbs == ["EHLO"] + ["MAIL", "RCPT", "DATA"] * 2 + ["RSET"] + [
        "MAIL",
        "RCPT",
        "DATA",
        "QUIT",
    ]


def test_a_data_accepted_without_recipients_is_closed_empty_and_the_session_goes_on() -> None:
    server = Scripted(data_anyway=True)
    outcomes = run_sync(run_scripted(server, ["refused@example.com", "a@example.com"]))
    assert [(o.kind, o.stage) for o in outcomes] == [("bounce", "rcpt"), ("sent", "data_end")]
    assert [to for to, _ in server.delivered] == ["a@example.com"]
    assert "RSET" in server.commands


def test_garbage_instead_of_a_reply_defers_and_does_not_hang() -> None:
    outcomes = run_sync(run_scripted(Scripted(garbage=True), ["a@example.com"]))
    assert [(o.kind, o.stage) for o in outcomes] == [("defer", "mail")]
    assert "malformed SMTP reply" in outcomes[0].reply


def test_a_250_to_data_is_not_taken_for_a_delivery() -> None:
    server = Scripted(data_250=True)
    outcomes = run_sync(run_scripted(server, ["a@example.com"]))
    assert [(o.kind, o.code, o.stage) for o in outcomes] == [("defer", 250, "data")]
    assert server.delivered == [] and "RSET" in server.commands
