"""The SMTP transport against real aiosmtpd sinks: outcomes, TLS, AUTH, URLs."""

from __future__ import annotations

import asyncio
import mailbox
import socket
import ssl
from collections.abc import Coroutine, Iterator
from dataclasses import dataclass
from email.message import EmailMessage
from email.policy import SMTP, SMTPUTF8
from pathlib import Path
from typing import Any, TypeVar

import pytest
import trustme

from mailkit._aio import run_sync
from mailkit.dispatch.transport import (
    Outcome,
    SMTPConnection,
    SMTPTarget,
    classify_reply,
    parse_smtp_url,
    ssl_context_for,
)
from mailkit.errors import ConfigError, SMTPDeliveryError
from mailkit.sink import FaultPlan, Sink

# Every test here runs on uvloop and on asyncio's own loop.
pytestmark = pytest.mark.usefixtures("each_event_loop")

T = TypeVar("T")
SENDER = "bounces@news.example.com"


def run(coro: Coroutine[Any, Any, T]) -> T:
    return run_sync(coro)


def build_message(to: str, subject: str = "hello", body: str = "hi\n") -> bytes:
    msg = EmailMessage()
    msg["From"] = "news@example.com"
    msg["To"] = to
    msg["Subject"] = subject
    msg.set_content(body)
    return msg.as_bytes(policy=SMTP)


async def send_all(url: str, recipients: list[str], **kw: Any) -> list[Outcome]:
    async with SMTPConnection(url, **kw) as conn:
        return [await conn.send(SENDER, r, build_message(r, r)) for r in recipients]


# -- TLS material ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class TLSFiles:
    server: ssl.SSLContext
    cafile: str


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> TLSFiles:
    ca = trustme.CA()
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1", "localhost").configure_cert(server)
    cafile = tmp_path_factory.mktemp("ca") / "ca.pem"
    ca.cert_pem.write_to_path(str(cafile))
    return TLSFiles(server, str(cafile))


@pytest.fixture(autouse=True)
def _no_env_credentials(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("MAILKIT_SMTP_USER", "MAILKIT_SMTP_PASSWORD", "MAILKIT_SMTP_CAFILE"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def closed_port() -> Iterator[int]:
    """A port nobody listens on: bound (so nobody else takes it) but not listening."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield sock.getsockname()[1]


# -- plain sending --------------------------------------------------------------------------------


def test_plain_send_is_stored_in_the_maildir_and_parses_back(tmp_path: Path) -> None:
    with Sink(maildir=tmp_path / "md") as sink:
        outcomes = run(send_all(sink.url, ["a@example.com", "b@example.com"]))
        assert [o.kind for o in outcomes] == ["sent", "sent"]
        assert outcomes[0].code == 250 and outcomes[0].stage == "data_end"
        assert [e.mail_from for e in sink.envelopes()] == [SENDER, SENDER]
    box = mailbox.Maildir(tmp_path / "md", create=False)
    assert sorted(m["To"] for m in box) == ["a@example.com", "b@example.com"]


def test_body_survives_dot_stuffing_bare_newlines_and_8bit_utf8() -> None:
    msg = EmailMessage()
    msg["From"] = "news@example.com"
    msg["To"] = "山田@example.jp"
    msg["Subject"] = "春のお知らせ"
    msg.set_content(".starts with a dot\n..two dots\n.\n東京都\n", cte="8bit")
    raw = msg.as_bytes(policy=SMTPUTF8.clone(linesep="\n"))  # bare LF on purpose

    async def scenario(url: str) -> Outcome:
        async with SMTPConnection(url) as conn:
            return await conn.send(SENDER, "山田@example.jp", raw)

    with Sink() as sink:
        assert run(scenario(sink.url)).kind == "sent"
        (received,) = sink.envelopes()
        assert received.rcpt_tos == ("山田@example.jp",)
        assert received.data == raw.replace(b"\n", b"\r\n")
        assert sink.messages()[0]["Subject"] == "春のお知らせ"


@pytest.mark.parametrize("gate", [None, True], ids=["one-write", "end-held-back"])
def test_a_crlf_message_is_dot_stuffed_without_the_line_end_check(gate: bool | None) -> None:
    msg = EmailMessage()
    msg["From"] = "news@example.com"
    msg["To"] = "a@example.jp"
    msg.set_content(".starts with a dot\n..two dots\n.\nlast line without a break", cte="8bit")
    raw = msg.as_bytes(policy=SMTP).rstrip(b"\r\n")  # CRLF, no final line break

    async def scenario(url: str) -> Outcome:
        before_end = None
        if gate is not None:
            before_end = asyncio.get_running_loop().create_future()
            before_end.set_result(gate)
        async with SMTPConnection(url) as conn:
            return await conn.send(SENDER, "a@example.jp", raw, before_end=before_end, crlf=True)

    with Sink() as sink:
        assert run(scenario(sink.url)).kind == "sent"
        (received,) = sink.envelopes()
        assert received.data == raw + b"\r\n"  # the server removed the stuffing


def test_rcpt_replies_classify_and_the_connection_keeps_working() -> None:
    replies = {
        "unknown@example.com": "550 5.1.1 <unknown@example.com>: user unknown",
        "later@example.com": "451 4.3.0 try later",
        "rejected@example.com": "554 5.0.0 transaction failed",
        "dmarc@example.com": "550 5.7.26 unauthenticated mail is prohibited",
    }
    order = [
        "ok1@example.com",
        "unknown@example.com",
        "later@example.com",
        "ok2@example.com",
        "rejected@example.com",
        "dmarc@example.com",
        "ok3@example.com",
    ]
    with Sink(rcpt_replies=replies) as sink:
        outcomes = run(send_all(sink.url, order))
        kinds = dict(zip(order, (o.kind for o in outcomes), strict=True))
        assert kinds == {
            "ok1@example.com": "sent",
            "unknown@example.com": "bounce",
            "later@example.com": "defer",
            "ok2@example.com": "sent",
            "rejected@example.com": "fail",
            "dmarc@example.com": "stop",
            "ok3@example.com": "sent",
        }
        bounce = outcomes[1]
        assert (bounce.code, bounce.enhanced, bounce.stage) == (550, "5.1.1", "rcpt")
        assert "user unknown" in bounce.reply
        stored = [e.rcpt_tos[0] for e in sink.envelopes()]
        assert stored == ["ok1@example.com", "ok2@example.com", "ok3@example.com"]


def test_data_end_reply_fault_is_a_failure_of_that_message_only() -> None:
    plan = FaultPlan(data_replies={"huge@example.com": "552 5.3.4 message too big"})
    with Sink(faults=plan) as sink:
        big, ok = run(send_all(sink.url, ["huge@example.com", "ok@example.com"]))
        assert (big.kind, big.code, big.stage) == ("fail", 552, "data_end")
        assert ok.kind == "sent"
        assert sink.count == 1


def test_connection_dropped_after_data_is_unknown_never_retried_blindly() -> None:
    plan = FaultPlan(drop_after_data={"lost@example.com"})
    with Sink(faults=plan) as sink:
        lost, after = run(send_all(sink.url, ["lost@example.com", "next@example.com"]))
        assert (lost.kind, lost.code, lost.stage) == ("unknown", None, "data_end")
        assert after.kind == "sent"  # reconnected transparently
        # The server did store it: exactly why "unknown" must not be retried as "defer".
        assert [e.rcpt_tos[0] for e in sink.envelopes()] == ["lost@example.com", "next@example.com"]


def test_server_stalling_past_the_timeout_is_a_defer() -> None:
    with Sink(faults=FaultPlan(stall_at_rcpt={"slow@example.com"})) as sink:
        (outcome,) = run(send_all(sink.url + "?timeout=0.5", ["slow@example.com"]))
        assert (outcome.kind, outcome.stage) == ("defer", "rcpt")
        assert sink.count == 0


def test_sink_stopped_mid_session_is_a_defer_not_an_exception() -> None:
    sink = Sink(faults=FaultPlan(stall_at_rcpt={"slow@example.com"})).start()

    async def scenario() -> Outcome:
        async with SMTPConnection(sink.url) as conn:
            task = asyncio.create_task(conn.send(SENDER, "slow@example.com", b"Subject: x\r\n\r\n"))
            for _ in range(1000):  # bounded wait until the server is inside RCPT TO
                if sink.stalled:
                    break
                await asyncio.sleep(0.01)
            assert sink.stalled == 1
            await asyncio.to_thread(sink.stop)
            return await task

    try:
        outcome = run(scenario())
    finally:
        sink.stop()
    assert (outcome.kind, outcome.code, outcome.stage) == ("defer", None, "rcpt")


def test_connection_cut_in_the_middle_of_the_data_is_a_defer() -> None:
    # Larger than every buffer between client and server, so the cut is seen before the end:
    # the final "." was never sent, so the message provably did not arrive and may be retried.
    body = "x" * 76 + "\n"
    big = build_message("cut@example.com", body=body * (24 * 1024 * 1024 // len(body)))
    with Sink(faults=FaultPlan(drop_mid_data={"cut@example.com"})) as sink:
        cut, after = run(
            send_all_bytes(sink.url, [("cut@example.com", big), ("ok@example.com", None)])
        )
        assert (cut.kind, cut.code, cut.stage) == ("defer", None, "data")
        assert after.kind == "sent"
        assert [e.rcpt_tos for e in sink.envelopes()] == [("ok@example.com",)]


# -- before_end: the final dot waits for the caller (the ledger's mark) ---------------------------


def test_before_end_holds_the_final_dot_until_it_resolves() -> None:
    seen: list[int] = []

    async def scenario(sink: Sink) -> list[Outcome]:
        loop = asyncio.get_running_loop()

        async def agree_later(gate: asyncio.Future[bool]) -> None:
            await asyncio.sleep(0.05)  # ample time for a dot to arrive, were it sent
            seen.append(sink.count)
            gate.set_result(True)

        async with SMTPConnection(sink.url) as conn:
            outcomes = []
            for to in ("a@example.com", "gone@example.com"):
                gate: asyncio.Future[bool] = loop.create_future()
                agreeing = asyncio.create_task(agree_later(gate))
                outcomes.append(await conn.send(SENDER, to, build_message(to), before_end=gate))
                await agreeing
            return outcomes

    with Sink(rcpt_replies={"gone@example.com": "550 5.1.1 user unknown"}) as sink:
        first, refused = run(scenario(sink))
        assert first.kind == "sent" and refused.kind == "bounce"
        # The server had the data but not its end until the gate opened; a refusal at RCPT
        # did not wait for the gate.
        assert seen == [0, 1]
        assert refused.stage == "rcpt"
        assert [e.rcpt_tos for e in sink.envelopes()] == [("a@example.com",)]


def test_an_open_gate_sends_the_message_in_one_go() -> None:
    async def scenario(url: str) -> Outcome:
        gate: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        gate.set_result(True)
        async with SMTPConnection(url) as conn:
            return await conn.send(
                SENDER, "a@example.com", build_message("a@example.com"), before_end=gate
            )

    with Sink() as sink:
        assert run(scenario(sink.url)).kind == "sent"
        assert sink.count == 1


def _resolved(value: bool | BaseException) -> asyncio.Future[bool]:
    gate: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
    if isinstance(value, BaseException):
        gate.set_exception(value)
    else:
        gate.set_result(value)
    return gate


def test_before_end_saying_no_withholds_the_message_and_the_server_discards_it() -> None:
    async def scenario(url: str) -> list[Outcome]:
        async with SMTPConnection(url) as conn:
            held = await conn.send(
                SENDER, "x@example.com", build_message("x@example.com"), before_end=_resolved(False)
            )
            assert not conn.is_open  # dropped mid-data: the only way to abandon a DATA
            after = await conn.send(SENDER, "y@example.com", build_message("y@example.com"))
            return [held, after]

    with Sink() as sink:
        held, after = run(scenario(sink.url))
        assert (held.kind, held.code, held.stage) == ("withheld", None, "data")
        assert after.kind == "sent"  # reconnected
        assert [e.rcpt_tos for e in sink.envelopes()] == [("y@example.com",)]


def test_before_end_raising_drops_the_connection_and_propagates() -> None:
    async def scenario(url: str) -> Outcome:
        async with SMTPConnection(url) as conn:
            broken = _resolved(RuntimeError("the ledger commit failed"))
            with pytest.raises(RuntimeError, match="ledger commit failed"):
                await conn.send(
                    SENDER, "x@example.com", build_message("x@example.com"), before_end=broken
                )
            assert not conn.is_open
            return await conn.send(SENDER, "y@example.com", build_message("y@example.com"))

    with Sink() as sink:
        assert run(scenario(sink.url)).kind == "sent"
        assert [e.rcpt_tos for e in sink.envelopes()] == [("y@example.com",)]


def test_connection_lost_while_the_end_is_held_back_is_a_defer() -> None:
    # The server cuts the connection while the client waits to send the final dot: the dot
    # never left, so the message provably did not arrive and may be retried (not "unknown").
    async def scenario(url: str) -> Outcome:
        gate: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        async with SMTPConnection(url) as conn:

            async def open_after_the_cut() -> None:
                for _ in range(500):  # bounded: until the client has seen the reset
                    if not conn.is_open:
                        break
                    await asyncio.sleep(0.01)
                gate.set_result(True)

            opening = asyncio.create_task(open_after_the_cut())
            to = "cut@example.com"
            outcome = await conn.send(SENDER, to, build_message(to), before_end=gate)
            await opening
            return outcome

    with Sink(faults=FaultPlan(drop_mid_data={"cut@example.com"})) as sink:
        cut = run(scenario(sink.url))
        assert (cut.kind, cut.code, cut.stage) == ("defer", None, "data")
        assert sink.count == 0


async def send_all_bytes(url: str, items: list[tuple[str, bytes | None]]) -> list[Outcome]:
    async with SMTPConnection(url) as conn:
        return [await conn.send(SENDER, r, data or build_message(r)) for r, data in items]


def test_no_final_reply_within_data_timeout_is_unknown() -> None:
    plan = FaultPlan(stall_at_data_end={"silent@example.com"})
    with Sink(faults=plan) as sink:
        url = sink.url + "?timeout=5&data_timeout=0.3"
        silent, after = run(send_all(url, ["silent@example.com", "next@example.com"]))
        assert (silent.kind, silent.stage) == ("unknown", "data_end")
        assert after.kind == "sent"
        assert sink.count == 2  # it did arrive: why "unknown" is never retried by itself


def test_ensure_open_reports_a_busy_relay_as_a_defer() -> None:
    with Sink(faults=FaultPlan(greeting_reply="421 4.3.2 too busy")) as sink:

        async def scenario() -> Outcome | None:
            conn = SMTPConnection(sink.url)
            try:
                return await conn.ensure_open()
            finally:
                await conn.close()

        outcome = run(scenario())
        assert outcome is not None and (outcome.kind, outcome.stage) == ("defer", "connect")
    with Sink() as healthy:

        async def ready() -> Outcome | None:
            async with SMTPConnection(healthy.url) as conn:
                return await conn.ensure_open()

        assert run(ready()) is None


def test_421_after_n_messages_reconnects_transparently() -> None:
    with Sink(faults=FaultPlan(messages_per_connection=2)) as sink:
        outcomes = run(send_all(sink.url, [f"u{n}@example.com" for n in range(5)]))
        assert [o.kind for o in outcomes] == ["sent"] * 5
        assert sink.count == 5


def test_idle_connection_closed_by_the_server_is_reopened_transparently() -> None:
    async def scenario(url: str) -> list[Outcome]:
        async with SMTPConnection(url) as conn:
            first = await conn.send(SENDER, "a@example.com", build_message("a@example.com"))
            for _ in range(1000):  # bounded wait until the server's idle timeout hangs up
                if not conn.is_open:
                    break
                await asyncio.sleep(0.01)
            assert not conn.is_open
            second = await conn.send(SENDER, "b@example.com", build_message("b@example.com"))
            return [first, second]

    with Sink(idle_timeout=0.2) as sink:
        assert [o.kind for o in run(scenario(sink.url))] == ["sent", "sent"]
        assert sink.count == 2


def test_421_greeting_raises_on_open_and_defers_on_send() -> None:
    with Sink(faults=FaultPlan(greeting_reply="421 4.3.2 too busy")) as sink:
        with pytest.raises(SMTPDeliveryError, match="421"):
            run(SMTPConnection(sink.url).open())

        async def scenario() -> Outcome:
            conn = SMTPConnection(sink.url)
            try:
                return await conn.send(SENDER, "a@example.com", b"Subject: x\r\n\r\n")
            finally:
                await conn.close()

        outcome = run(scenario())
        assert (outcome.kind, outcome.stage) == ("defer", "connect")
        assert "421" in outcome.reply


def test_connection_refused_names_host_and_port(closed_port: int) -> None:
    with pytest.raises(SMTPDeliveryError, match=f"127.0.0.1:{closed_port}.*refused") as info:
        run(SMTPConnection(f"smtp://127.0.0.1:{closed_port}?timeout=5").open())
    assert "mailkit sink" in str(info.value)
    assert isinstance(info.value, ConnectionError)


# -- TLS ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("starttls", [True, False], ids=["starttls", "implicit-tls"])
def test_tls_verifies_with_the_ca_file(tls: TLSFiles, starttls: bool) -> None:
    with Sink(tls_context=tls.server, starttls=starttls) as sink:
        target = parse_smtp_url(sink.url)
        assert target.security == ("starttls" if starttls else "tls")
        ctx = ssl_context_for(target, cafile=tls.cafile)

        async def scenario() -> tuple[Outcome, bool]:
            async with SMTPConnection(target, ssl_context=ctx) as conn:
                outcome = await conn.send(SENDER, "a@example.com", build_message("a@example.com"))
                assert conn._smtp is not None
                encrypted = conn._smtp.get_transport_info("sslcontext") is not None
                return outcome, encrypted

        outcome, encrypted = run(scenario())
        assert outcome.kind == "sent" and encrypted
        assert sink.count == 1


@pytest.mark.parametrize("starttls", [True, False], ids=["starttls", "implicit-tls"])
def test_tls_without_the_ca_fails_loudly_and_sends_nothing(tls: TLSFiles, starttls: bool) -> None:
    with Sink(tls_context=tls.server, starttls=starttls) as sink:
        with pytest.raises(SMTPDeliveryError, match="MAILKIT_SMTP_CAFILE") as info:
            run(send_all(sink.url, ["a@example.com"]))
        assert "plaintext" in str(info.value)
        assert sink.count == 0


def test_ca_file_from_the_environment(tls: TLSFiles, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MAILKIT_SMTP_CAFILE", tls.cafile)
    with Sink(tls_context=tls.server, starttls=True) as sink:
        assert [o.kind for o in run(send_all(sink.url, ["a@example.com"]))] == ["sent"]


def test_missing_ca_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="CA file"):
        ssl_context_for(SMTPTarget("mail.example.com", 587), cafile=str(tmp_path / "nope.pem"))


def test_starttls_required_but_not_offered_never_sends_in_plaintext(tls: TLSFiles) -> None:
    with Sink() as sink:
        url = f"smtp+starttls://127.0.0.1:{sink.port}"
        with pytest.raises(SMTPDeliveryError, match="does not offer STARTTLS"):
            run(
                send_all(
                    url,
                    ["a@example.com"],
                    ssl_context=ssl_context_for(parse_smtp_url(url), cafile=tls.cafile),
                )
            )
        assert sink.count == 0


def test_implicit_tls_against_a_plain_server_fails(tls: TLSFiles) -> None:
    with Sink() as sink:
        url = f"smtps://127.0.0.1:{sink.port}?timeout=5"
        ctx = ssl_context_for(parse_smtp_url(url), cafile=tls.cafile)
        with pytest.raises(SMTPDeliveryError, match="TLS"):
            run(send_all(url, ["a@example.com"], ssl_context=ctx))
        assert sink.count == 0


# -- AUTH -----------------------------------------------------------------------------------------


def test_auth_success_over_starttls(tls: TLSFiles) -> None:
    with Sink(tls_context=tls.server, starttls=True, auth=("alice", "pä ss:/@")) as sink:
        url = f"smtp+starttls://alice:p%C3%A4%20ss%3A%2F%40@127.0.0.1:{sink.port}"
        ctx = ssl_context_for(parse_smtp_url(url), cafile=tls.cafile)
        assert [o.kind for o in run(send_all(url, ["a@example.com"], ssl_context=ctx))] == ["sent"]


def test_auth_failure_names_the_reply_but_never_the_password() -> None:
    password = "hunter2-very-secret"
    with Sink(auth=("alice", "right")) as sink:
        url = f"smtp://alice:{password}@127.0.0.1:{sink.port}"
        with pytest.raises(SMTPDeliveryError) as info:
            run(send_all(url, ["a@example.com"]))
        text = f"{info.value} {info.value!r} {info.value.url} {info.value.__cause__!r}"
        assert "535" in text and "alice" in text
        assert password not in text
        assert sink.count == 0


def test_credentials_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MAILKIT_SMTP_USER", "alice")
    monkeypatch.setenv("MAILKIT_SMTP_PASSWORD", "right")
    with Sink(auth=("alice", "right")) as sink:
        assert [o.kind for o in run(send_all(sink.url, ["a@example.com"]))] == ["sent"]


def test_no_auth_configured_against_an_auth_server_stops() -> None:
    with Sink(auth=("alice", "right")) as sink:
        (outcome,) = run(send_all(sink.url, ["a@example.com"]))
        assert (outcome.kind, outcome.code, outcome.stage) == ("stop", 530, "mail")


# -- URLs -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("smtp://mail.example.com", SMTPTarget("mail.example.com", 25, "none")),
        ("smtp://127.0.0.1:2525", SMTPTarget("127.0.0.1", 2525, "none")),
        ("SMTP://Mail.Example.com:25/", SMTPTarget("mail.example.com", 25, "none")),
        (
            "smtp+starttls://user:pa%40ss@mail.example.com:587",
            SMTPTarget("mail.example.com", 587, "starttls", "user", "pa@ss"),
        ),
        ("smtp+starttls://mail.example.com", SMTPTarget("mail.example.com", 587, "starttls")),
        ("smtps://mail.example.com", SMTPTarget("mail.example.com", 465, "tls")),
        (
            "smtps://mail.example.com:1465?timeout=2.5",
            SMTPTarget("mail.example.com", 1465, "tls", timeout=2.5),
        ),
        ("smtp://[::1]:25", SMTPTarget("::1", 25, "none")),
        ("smtp://u%C3%BC:p@localhost:25", SMTPTarget("localhost", 25, "none", "uü", "p")),
        (
            "smtp://relay:25?data_timeout=120",
            SMTPTarget("relay", 25, "none", timeout=30.0, data_timeout=120.0),
        ),
    ],
)
def test_parse_smtp_url(url: str, expected: SMTPTarget) -> None:
    assert parse_smtp_url(url) == expected


@pytest.mark.parametrize(
    ("url", "problem"),
    [
        ("", "no SMTP URL"),
        ("mail.example.com:25", "unknown scheme"),
        ("http://mail.example.com", "unknown scheme"),
        ("smtp://", "no host"),
        ("smtp://mail.example.com:99999", "out of range"),
        ("smtp://mail.example.com:abc", "Port could not be cast"),
        ("smtp://mail.example.com:0", "port 0"),
        ("smtp://mail.example.com/inbox", "no path"),
        ("smtp://mail.example.com?timout=3", "unknown parameter"),
        ("smtp://mail.example.com?timeout=fast", "not a number"),
        ("smtp://mail.example.com?timeout=-1", "positive"),
        ("smtp://mail.example.com?data_timeout=0", "positive"),
        ("smtp://user:secret@mail.example.com", "unencrypted"),
        ("smtp+starttls://:secret@mail.example.com", "password without a user"),
    ],
)
def test_bad_smtp_urls_say_what_is_wrong_and_show_a_good_one(url: str, problem: str) -> None:
    with pytest.raises(ConfigError, match=problem) as info:
        parse_smtp_url(url)
    assert "smtp+starttls://user:password@mail.example.com:587" in str(info.value)
    assert "secret" not in str(info.value)


def test_env_credentials_fill_in_only_what_the_url_lacks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MAILKIT_SMTP_USER", "envuser")
    monkeypatch.setenv("MAILKIT_SMTP_PASSWORD", "envpass")
    base = "smtp+starttls://mail.example.com"
    assert parse_smtp_url(base).username == "envuser"
    assert parse_smtp_url(base).password == "envpass"
    both = parse_smtp_url("smtp+starttls://u:p@mail.example.com")
    assert (both.username, both.password) == ("u", "p")
    user_only = parse_smtp_url("smtp+starttls://u@mail.example.com")
    assert (user_only.username, user_only.password) == ("u", "envpass")


def test_target_repr_hides_the_password() -> None:
    target = parse_smtp_url("smtps://alice:topsecret@mail.example.com")
    assert "topsecret" not in repr(target) and "topsecret" not in str(target)
    assert target.safe_url == "smtps://alice@mail.example.com:465"


# -- reply classification -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("code", "message", "stage", "kind"),
    [
        (250, "2.0.0 OK queued", "data_end", "sent"),
        (550, "5.1.1 user unknown", "rcpt", "bounce"),
        (550, "no such user", "rcpt", "bounce"),
        (551, "user not local", "rcpt", "bounce"),
        (553, "mailbox name not allowed", "rcpt", "bounce"),
        (554, "5.1.2 bad destination system", "rcpt", "bounce"),
        (550, "5.1.1 user unknown", "data_end", "bounce"),
        (550, "5.7.26 DMARC policy", "rcpt", "stop"),
        (554, "5.7.1 rejected as spam", "data_end", "stop"),
        (530, "5.7.0 authentication required", "mail", "stop"),
        (535, "authentication failed", "mail", "stop"),
        (553, "5.1.8 sender domain does not exist", "mail", "stop"),
        (554, "transaction failed", "rcpt", "fail"),
        (550, "5.2.1 mailbox disabled", "rcpt", "fail"),
        (552, "5.3.4 message too big", "data_end", "fail"),
        (554, "no valid recipients", "data", "fail"),
        (451, "4.3.0 try later", "rcpt", "defer"),
        (421, "4.4.2 timeout", "mail", "defer"),
        (452, "4.2.2 mailbox full", "data_end", "defer"),
        (554, "no SMTP service here", "connect", "stop"),
        (None, "connection lost", "rcpt", "defer"),
        (None, "connection lost", "data", "defer"),
        (None, "connection lost", "data_end", "unknown"),
    ],
)
def test_classify_reply(code: int | None, message: str, stage: Any, kind: str) -> None:
    outcome = classify_reply(code, message, stage)
    assert outcome.kind == kind
    assert outcome.stage == stage


def test_421_closes_the_connection_and_enhanced_code_is_parsed() -> None:
    outcome = classify_reply(421, "4.3.2 shutting down", "rcpt")
    assert outcome.closes_connection and outcome.enhanced == "4.3.2"
    assert outcome.reply == "421 4.3.2 shutting down"
    assert classify_reply(550, "user unknown", "rcpt").enhanced is None


def test_addresses_with_line_breaks_are_refused_before_anything_is_sent() -> None:
    with Sink() as sink:

        async def scenario() -> Outcome:
            async with SMTPConnection(sink.url) as conn:
                return await conn.send(SENDER, "a@example.com\r\nRCPT TO:<x@y>", b"x")

        assert run(scenario()).kind == "fail"
        assert sink.count == 0
