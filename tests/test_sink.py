"""The embedded SMTP sink, driven by the standard library's smtplib (an independent client)."""

from __future__ import annotations

import mailbox
import signal
import smtplib
import socket
import subprocess
import sys
import threading
from email.message import EmailMessage
from email.policy import SMTPUTF8
from pathlib import Path

import pytest

from mailkit.errors import ConfigError
from mailkit.sink import FaultPlan, Sink


def build_message(to: str, subject: str = "hello", body: str = "hi\n") -> EmailMessage:
    msg = EmailMessage()
    msg["From"] = "news@example.com"
    msg["To"] = to
    msg["Subject"] = subject
    msg.set_content(body)
    return msg


def test_sink_picks_a_free_port_and_keeps_messages_in_memory() -> None:
    with Sink() as sink:
        assert sink.port != 0
        assert sink.url == f"smtp://127.0.0.1:{sink.port}"
        with smtplib.SMTP("127.0.0.1", sink.port, timeout=10) as client:
            client.send_message(build_message("a@example.com", "first"))
            client.send_message(build_message("b@example.com", "second"))
        assert sink.count == 2
        envelopes = sink.envelopes()
        assert [e.rcpt_tos for e in envelopes] == [("a@example.com",), ("b@example.com",)]
        assert envelopes[0].mail_from == "news@example.com"
        assert [m["Subject"] for m in sink.messages()] == ["first", "second"]


def test_two_sinks_get_different_ports_and_a_taken_port_is_a_config_error() -> None:
    with Sink() as first, Sink() as second:
        assert first.port != second.port
        with pytest.raises(ConfigError, match="cannot listen"):
            Sink(port=first.port).start()


def test_maildir_store_holds_8bit_smtputf8_messages(tmp_path: Path) -> None:
    maildir = tmp_path / "Maildir"
    msg = build_message("山田花子@example.jp", "春のセールのお知らせ", "東京都のみなさまへ\n")
    with Sink(maildir=maildir) as sink, smtplib.SMTP("127.0.0.1", sink.port, timeout=10) as c:
        raw = msg.as_bytes(policy=SMTPUTF8)
        refused = c.sendmail(
            "news@example.com", ["山田花子@example.jp"], raw, mail_options=["SMTPUTF8"]
        )
        assert refused == {}
        assert sink.messages()[0]["Subject"] == "春のセールのお知らせ"
        assert "東京都" in sink.messages()[0].get_content()
    # Read back with the standard library, independently of the Sink.
    box = mailbox.Maildir(maildir, create=False)
    stored = [box.get_bytes(key) for key in box.iterkeys()]
    assert len(stored) == 1
    assert "春のセールのお知らせ".encode() in stored[0]


def test_mbox_store(tmp_path: Path) -> None:
    path = tmp_path / "sent.mbox"
    with Sink(mbox=path) as sink, smtplib.SMTP("127.0.0.1", sink.port, timeout=10) as c:
        for n in range(3):
            c.send_message(build_message(f"user{n}@example.com", f"n{n}", "From here on\n"))
        assert [m["Subject"] for m in sink.messages()] == ["n0", "n1", "n2"]
    assert [m["Subject"] for m in sink.messages()] == ["n0", "n1", "n2"]  # after stop too
    box = mailbox.mbox(path)
    try:
        assert sorted(m["Subject"] for m in box) == ["n0", "n1", "n2"]
        first = next(iter(box.keys()))
        assert box[first].get_from().startswith("news@example.com ")
        assert b"\n>From here on" in box.get_bytes(first)
    finally:
        box.close()


def test_maildir_and_mbox_together_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="either"):
        Sink(maildir=tmp_path / "m", mbox=tmp_path / "x.mbox")


def test_big_message_is_accepted() -> None:
    body = ("x" * 76 + "\n") * 100_000  # ~7.7 MB
    with Sink() as sink, smtplib.SMTP("127.0.0.1", sink.port, timeout=30) as c:
        c.send_message(build_message("big@example.com", "big", body))
        assert len(sink.envelopes()[0].data) > 7_000_000


def test_rcpt_replies_refuse_only_the_named_recipients_case_insensitively() -> None:
    replies = {"Gone@Example.com": "550 5.1.1 <gone@example.com>: user unknown"}
    with Sink(rcpt_replies=replies) as sink, smtplib.SMTP("127.0.0.1", sink.port) as c:
        refused = c.sendmail(
            "news@example.com", ["gone@example.COM", "ok@example.com"], b"Subject: x\r\n\r\nx\r\n"
        )
        assert refused == {"gone@example.COM": (550, b"5.1.1 <gone@example.com>: user unknown")}
        assert [e.rcpt_tos for e in sink.envelopes()] == [("ok@example.com",)]


def test_data_replies_refuse_the_message_and_nothing_is_stored() -> None:
    plan = FaultPlan(data_replies={"spam@example.com": "554 5.7.1 message rejected as spam"})
    with Sink(faults=plan) as sink, smtplib.SMTP("127.0.0.1", sink.port) as c:
        with pytest.raises(smtplib.SMTPDataError) as info:
            c.sendmail("news@example.com", ["spam@example.com"], b"Subject: x\r\n\r\nx\r\n")
        assert info.value.smtp_code == 554
        c.sendmail("news@example.com", ["fine@example.com"], b"Subject: y\r\n\r\ny\r\n")
        assert [e.rcpt_tos for e in sink.envelopes()] == [("fine@example.com",)]


def test_greeting_fault_and_messages_per_connection() -> None:
    with Sink(faults=FaultPlan(greeting_reply="421 4.3.2 too busy")) as sink:
        with pytest.raises(smtplib.SMTPConnectError) as info:
            smtplib.SMTP("127.0.0.1", sink.port, timeout=10)
        assert info.value.smtp_code == 421
    with Sink(faults=FaultPlan(messages_per_connection=1)) as sink:
        with smtplib.SMTP("127.0.0.1", sink.port, timeout=10) as c:
            c.sendmail("a@example.com", ["b@example.com"], b"Subject: 1\r\n\r\n1\r\n")
            with pytest.raises(smtplib.SMTPSenderRefused) as refused:
                c.sendmail("a@example.com", ["b@example.com"], b"Subject: 2\r\n\r\n2\r\n")
            assert refused.value.smtp_code == 421
        assert sink.count == 1


@pytest.mark.parametrize("reply", ["55 x", "hello", "600 nope", "550x"])
def test_malformed_fault_replies_are_config_errors(reply: str) -> None:
    with pytest.raises(ConfigError, match="3-digit"):
        Sink(rcpt_replies={"a@example.com": reply})


def test_auth_is_required_before_mail_when_configured() -> None:
    with Sink(auth=("alice", "s3cret")) as sink:
        with smtplib.SMTP("127.0.0.1", sink.port, timeout=10) as c:
            with pytest.raises(smtplib.SMTPSenderRefused) as info:
                c.sendmail("a@example.com", ["b@example.com"], b"Subject: x\r\n\r\nx\r\n")
            assert info.value.smtp_code == 530
        with (
            smtplib.SMTP("127.0.0.1", sink.port, timeout=10) as c,
            pytest.raises(smtplib.SMTPAuthenticationError),
        ):
            c.login("alice", "wrong")
        with smtplib.SMTP("127.0.0.1", sink.port, timeout=10) as c:
            c.login("alice", "s3cret")
            c.sendmail("a@example.com", ["b@example.com"], b"Subject: x\r\n\r\nx\r\n")
        assert sink.count == 1


def test_starttls_sink_refuses_mail_before_starttls() -> None:
    import ssl

    trustme = pytest.importorskip("trustme")
    ca = trustme.CA()
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(ctx)
    with Sink(tls_context=ctx, starttls=True) as sink:
        assert sink.url == f"smtp+starttls://127.0.0.1:{sink.port}"
        with smtplib.SMTP("127.0.0.1", sink.port, timeout=10) as c:
            c.ehlo()
            assert c.has_extn("starttls")
            with pytest.raises(smtplib.SMTPSenderRefused) as info:
                c.sendmail("a@example.com", ["b@example.com"], b"Subject: x\r\n\r\nx\r\n")
            assert info.value.smtp_code == 530
        assert sink.count == 0
    with Sink(tls_context=ctx) as sink:
        assert sink.url == f"smtps://127.0.0.1:{sink.port}"


def test_messages_can_be_read_while_several_clients_send() -> None:
    with Sink() as sink:
        seen_counts: list[int] = []

        def client(n: int) -> None:
            with smtplib.SMTP("127.0.0.1", sink.port, timeout=10) as c:
                for i in range(5):
                    c.send_message(build_message(f"u{n}-{i}@example.com", f"{n}-{i}"))
                    seen_counts.append(len(sink.messages()))

        threads = [threading.Thread(target=client, args=(n,)) for n in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert sink.count == 20
        assert len({m["Subject"] for m in sink.messages()}) == 20
        assert all(1 <= c <= 20 for c in seen_counts)


def test_stop_is_idempotent_and_the_port_is_released() -> None:
    sink = Sink().start()
    port = sink.port
    sink.stop()
    sink.stop()
    with pytest.raises(OSError), smtplib.SMTP("127.0.0.1", port, timeout=5):
        pass


def test_serve_sink_runs_until_sigterm(tmp_path: Path) -> None:
    maildir = tmp_path / "Maildir"
    code = (
        "import sys\n"
        "from mailkit.sink import serve_sink\n"
        f"serve_sink(host='127.0.0.1', port=0, maildir={str(maildir)!r},\n"
        "           on_ready=lambda s: print(s.port, flush=True))\n"
        "print('stopped', flush=True)\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, cwd=tmp_path
    )
    try:
        assert proc.stdout is not None
        port = int(proc.stdout.readline())
        with smtplib.SMTP("127.0.0.1", port, timeout=10) as c:
            c.send_message(build_message("a@example.com", "served"))
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0
    assert "stopped" in out
    box = mailbox.Maildir(maildir, create=False)
    assert [m["Subject"] for m in box] == ["served"]


def test_greeting_replies_apply_to_the_first_connections_only() -> None:
    plan = FaultPlan(greeting_replies=("421 4.7.0 slow down", None, "421 4.3.2 busy"))
    with Sink(faults=plan) as sink:
        codes = []
        for _ in range(4):
            with socket.create_connection(("127.0.0.1", sink.port), timeout=5) as sock:
                codes.append(sock.recv(100)[:3])
        assert codes == [b"421", b"220", b"421", b"220"]
        assert sink.connections == 4


def test_rcpt_reply_times_make_a_failure_temporary() -> None:
    plan = FaultPlan(
        rcpt_replies={"a@example.com": "451 4.3.0 later"}, rcpt_reply_times={"A@example.com": 2}
    )
    with Sink(faults=plan) as sink:
        with smtplib.SMTP("127.0.0.1", sink.port, timeout=5) as client:
            results = []
            for _ in range(3):
                try:
                    client.sendmail("s@example.com", ["a@example.com"], b"Subject: x\r\n\r\nx\r\n")
                    results.append(250)
                except smtplib.SMTPRecipientsRefused as exc:
                    results.append(exc.recipients["a@example.com"][0])
        assert results == [451, 451, 250]
        assert sink.count == 1


def test_drop_mid_data_stores_nothing_and_stall_at_data_end_stores_but_never_answers() -> None:
    plan = FaultPlan(drop_mid_data={"cut@example.com"}, stall_at_data_end={"quiet@example.com"})
    with Sink(faults=plan) as sink:
        with (
            smtplib.SMTP("127.0.0.1", sink.port, timeout=5) as client,
            pytest.raises(smtplib.SMTPServerDisconnected),
        ):
            client.sendmail("s@example.com", ["cut@example.com"], b"Subject: x\r\n\r\nx\r\n")
        assert sink.count == 0
        with smtplib.SMTP("127.0.0.1", sink.port, timeout=0.5) as client:
            with pytest.raises((TimeoutError, smtplib.SMTPServerDisconnected)):
                client.sendmail("s@example.com", ["quiet@example.com"], b"Subject: x\r\n\r\nx\r\n")
            client.close()
        assert sink.count == 1
