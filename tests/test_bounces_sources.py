"""Bounce sources: a real (tiny, in-test) IMAP server over TLS, the SMTP listener, the CLI."""

from __future__ import annotations

import json
import re
import socket
import socketserver
import ssl
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiosmtplib
import pytest
import trustme
from bounce_support import DOMAIN, RECIPIENTS, Sent, add_contacts, render_fixture, send_spring
from click.testing import CliRunner
from sqlalchemy import Engine, select, text

from mailkit._aio import run_sync
from mailkit.bounces import (
    BounceListener,
    ImapSource,
    IngestReport,
    build_verp_address,
    ingest_bounces,
    load_bounce_rejects,
    open_source,
    run_bounce_listener,
)
from mailkit.cli_bounces import bounces
from mailkit.errors import ConfigError, MailboxError, NotFoundError
from mailkit.storage.schema import events, inbound_bounces, suppressions
from mailkit.tracking.tokens import Keyring, load_keyring

KEYRING = Keyring({"k1": bytes(range(32))}, "k1")
USER, PASSWORD = "bounces@shop.example.jp", 's3cret pa"ss'


# -- a minimal IMAP4rev1 server: LOGIN, SELECT, (UID) SEARCH UNSEEN, FETCH, STORE +FLAGS ----------


class FakeImap:
    """Holds messages as {uid: [raw, flags]}; TLS on connect (imaps). Faults are server-side."""

    def __init__(self, tls: ssl.SSLContext, messages: list[tuple[bytes, set[str]]]) -> None:
        self.tls = tls
        self.messages = {uid: [raw, flags] for uid, (raw, flags) in enumerate(messages, start=1)}
        self.lock = threading.Lock()
        self.hang_up_after_fetches: int | None = None
        self.fetches = 0
        fake = self

        class Handler(socketserver.StreamRequestHandler):
            def setup(self) -> None:
                self.request = fake.tls.wrap_socket(self.request, server_side=True)
                super().setup()

            def handle(self) -> None:
                fake.serve(self)

        self.server = _QuietServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> FakeImap:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()

    def seen(self) -> dict[int, bool]:
        with self.lock:
            return {uid: "\\Seen" in flags for uid, (_raw, flags) in self.messages.items()}

    def serve(self, h: socketserver.StreamRequestHandler) -> None:
        def send(line: str | bytes) -> None:
            h.wfile.write(line if isinstance(line, bytes) else line.encode() + b"\r\n")

        send("* OK fake IMAP4rev1 ready")
        authed = False
        while True:
            line = h.rfile.readline()
            if not line:
                return
            tag, _, rest = line.decode().strip().partition(" ")
            command, _, args = rest.partition(" ")
            command = command.upper()
            if command == "UID":
                command, _, args = args.partition(" ")
                command = command.upper()
            if command == "CAPABILITY":
                send("* CAPABILITY IMAP4rev1 AUTH=PLAIN")
                send(f"{tag} OK done")
            elif command == "LOGIN":
                user, password = _imap_strings(args)
                authed = (user, password) == (USER, PASSWORD)
                send(f"{tag} OK logged in" if authed else f"{tag} NO [AUTHENTICATIONFAILED] no")
            elif not authed and command not in ("LOGOUT",):
                send(f"{tag} BAD log in first")
            elif command == "SELECT":
                send(f"* {len(self.messages)} EXISTS")
                send("* FLAGS (\\Seen)")
                send(f"{tag} OK [READ-WRITE] selected")
            elif command == "SEARCH":
                with self.lock:
                    unseen = [str(u) for u, (_r, f) in self.messages.items() if "\\Seen" not in f]
                send("* SEARCH " + " ".join(unseen))
                send(f"{tag} OK done")
            elif command == "FETCH":
                uid = int(args.split()[0])
                self.fetches += 1
                if (
                    self.hang_up_after_fetches is not None
                    and self.fetches > self.hang_up_after_fetches
                ):
                    return  # the server goes away mid-run
                with self.lock:
                    raw, flags = self.messages[uid]
                    if "PEEK" not in args.upper():
                        flags.add("\\Seen")  # a plain FETCH BODY[] / RFC822 marks it read
                send(f"* {uid} FETCH (UID {uid} BODY[] {{{len(raw)}}}".encode() + b"\r\n" + raw)
                send(")")
                send(f"{tag} OK done")
            elif command == "STORE":
                uid = int(args.split()[0])
                with self.lock:
                    self.messages[uid][1].add("\\Seen")
                send(f"* {uid} FETCH (UID {uid} FLAGS (\\Seen))")
                send(f"{tag} OK done")
            elif command in ("CLOSE", "NOOP"):
                send(f"{tag} OK done")
            elif command == "LOGOUT":
                send("* BYE")
                send(f"{tag} OK bye")
                return
            else:
                send(f"{tag} BAD unknown command")


class _QuietServer(socketserver.ThreadingTCPServer):
    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # a client refusing our certificate is part of a test, not noise for the log


def _imap_strings(args: str) -> list[str]:
    found = re.findall(r'"((?:[^"\\]|\\.)*)"|(\S+)', args)
    return [re.sub(r"\\(.)", r"\1", quoted) if quoted else bare for quoted, bare in found]


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def tls(ca: trustme.CA) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(server)
    client = ssl.create_default_context()
    ca.configure_trust(client)
    return server, client


@pytest.fixture
def sent(db: Engine) -> dict[str, Sent]:
    add_contacts(db)
    return send_spring(db)


def imap_url(port: int) -> str:
    return f"imaps://{USER.replace('@', '%40')}@127.0.0.1:{port}/INBOX"


def test_imap_reads_unseen_and_flags_each_seen_once_recorded(
    db: Engine, sent: dict[str, Sent], tls: tuple[ssl.SSLContext, ssl.SSLContext]
) -> None:
    server_tls, client_tls = tls
    hard = render_fixture("postfix_hard.eml", sent[RECIPIENTS[0]], KEYRING)
    complaint = render_fixture("arf_yahoo.eml", sent[RECIPIENTS[6]], KEYRING)
    old = render_fixture("exim_hard.eml", sent[RECIPIENTS[1]], KEYRING)
    mail = [(hard, set()), (old, {"\\Seen"}), (complaint, set()), (b"\x00junk", set())]
    with FakeImap(server_tls, mail) as imap:
        source = ImapSource(imap_url(imap.port), password=PASSWORD, ssl_context=client_tls)
        assert PASSWORD not in source.name
        report = ingest_bounces(db, source, keyring=KEYRING)
        assert report == IngestReport(seen=3, hard=1, complaints=1, rejected=1, suppressed=2)
        assert imap.seen() == {1: True, 2: True, 3: True, 4: True}
        # Nothing unseen is left: a second run reads nothing.
        again = ImapSource(imap_url(imap.port), password=PASSWORD, ssl_context=client_tls)
        assert ingest_bounces(db, again, keyring=KEYRING) == IngestReport()
    # The already-seen message was left alone; the password is nowhere in the database.
    assert [r.reason for r in load_bounce_rejects(db)] == ["unparseable: no mail headers"]
    with db.connect() as conn:
        stored = [row.source for row in conn.execute(select(inbound_bounces.c.source))]
    assert all(s.startswith(f"imaps://{USER}@127.0.0.1:") and PASSWORD not in s for s in stored)


def test_imap_server_going_away_leaves_the_rest_unseen(
    db: Engine, sent: dict[str, Sent], tls: tuple[ssl.SSLContext, ssl.SSLContext]
) -> None:
    server_tls, client_tls = tls
    first = render_fixture("postfix_hard.eml", sent[RECIPIENTS[0]], KEYRING)
    second = render_fixture("gmail_hard.eml", sent[RECIPIENTS[3]], KEYRING)
    with FakeImap(server_tls, [(first, set()), (second, set())]) as imap:
        imap.hang_up_after_fetches = 1
        source = ImapSource(imap_url(imap.port), password=PASSWORD, ssl_context=client_tls)
        with pytest.raises(MailboxError, match="reading failed"):
            ingest_bounces(db, source, keyring=KEYRING)
        assert imap.seen() == {1: True, 2: False}
        imap.hang_up_after_fetches = None
        source = ImapSource(imap_url(imap.port), password=PASSWORD, ssl_context=client_tls)
        assert ingest_bounces(db, source, keyring=KEYRING).hard == 1
        assert imap.seen() == {1: True, 2: True}


def test_imap_refusals_are_clear_and_keep_the_password_out(
    db: Engine, tls: tuple[ssl.SSLContext, ssl.SSLContext], monkeypatch: pytest.MonkeyPatch
) -> None:
    server_tls, client_tls = tls
    with FakeImap(server_tls, []) as imap:
        wrong = ImapSource(imap_url(imap.port), password="wrong-password", ssl_context=client_tls)
        with pytest.raises(MailboxError, match="refused") as info:
            ingest_bounces(db, wrong, keyring=KEYRING)
        assert "wrong-password" not in str(info.value)
        # Without our CA the certificate does not verify: no login is attempted.
        untrusted = ImapSource(imap_url(imap.port), password=PASSWORD)
        with pytest.raises(MailboxError, match="cannot connect"):
            ingest_bounces(db, untrusted, keyring=KEYRING)
    monkeypatch.delenv("MAILKIT_IMAP_PASSWORD", raising=False)
    with pytest.raises(ConfigError, match="MAILKIT_IMAP_PASSWORD"):
        ImapSource("imaps://someone@127.0.0.1/INBOX")
    with pytest.raises(ConfigError, match="no bounce source"):
        open_source("pop3://x@y/")
    with pytest.raises(NotFoundError):
        open_source("/no/such/folder")


# -- the SMTP listener -----------------------------------------------------------------------


def smtp_send(port: int, rcpt: str, raw: bytes) -> tuple[int, str]:
    async def go() -> tuple[int, str]:
        client = aiosmtplib.SMTP(hostname="127.0.0.1", port=port, timeout=30, start_tls=False)
        async with client:
            _errors, reply = await client.sendmail("", [rcpt], raw)
            return 250, reply

    return run_sync(go())


def test_smtp_listener_records_before_it_answers(db: Engine, sent: dict[str, Sent]) -> None:
    hard, victim = sent[RECIPIENTS[0]], sent[RECIPIENTS[7]]
    verp_of_victim = build_verp_address(KEYRING, victim.row_id, DOMAIN)
    # A relay that rewrote the headers: the VERP survives only in the envelope.
    mangled = render_fixture("mangled.eml", victim, None)
    with BounceListener(db, keyring=KEYRING) as listener:
        code, _ = smtp_send(
            listener.port,
            "bounces@shop.example.jp",
            render_fixture("postfix_hard.eml", hard, KEYRING),
        )
        assert code == 250
        with db.connect() as conn:  # recorded by the time the relay got its 250
            assert conn.execute(select(suppressions.c.reason)).scalars().all() == ["hard_bounce"]
        smtp_send(listener.port, verp_of_victim, mangled)
        smtp_send(listener.port, "bounces@shop.example.jp", b"Subject: hi\r\n\r\nhello\r\n")
        assert listener.report == IngestReport(seen=3, hard=2, ignored=1, suppressed=2)
    with db.connect() as conn:
        query = select(events.c.message_id, events.c.detail).where(events.c.type == "bounce")
        matched = {row.message_id: row.detail for row in conn.execute(query)}
    assert matched[victim.row_id]["matched_by"] == "verp"
    assert matched[hard.row_id]["matched_by"] == "verp"


def test_smtp_listener_asks_the_relay_to_retry_when_the_db_cannot_store(
    db: Engine, sent: dict[str, Sent]
) -> None:
    raw = render_fixture("postfix_hard.eml", sent[RECIPIENTS[0]], KEYRING)
    with BounceListener(db, keyring=KEYRING) as listener:
        with db.begin() as conn:  # the database breaks under the server
            conn.execute(text("DROP TABLE inbound_bounces"))
        with pytest.raises(aiosmtplib.SMTPDataError) as info:
            smtp_send(listener.port, "bounces@shop.example.jp", raw)
        assert info.value.code == 451
    with db.connect() as conn:
        assert conn.execute(select(suppressions.c.email)).all() == []


def test_the_listener_as_an_async_companion(db: Engine, sent: dict[str, Sent]) -> None:
    raw = render_fixture("exchange_hard.eml", sent[RECIPIENTS[2]], KEYRING)

    async def serve_and_send() -> IngestReport:
        async with run_bounce_listener(db, 0, keyring=KEYRING) as listener:
            client = aiosmtplib.SMTP(hostname="127.0.0.1", port=listener.port, timeout=30)
            async with client:
                await client.sendmail("", ["bounces@shop.example.jp"], raw)
            return listener.report

    assert run_sync(serve_and_send()) == IngestReport(seen=1, hard=1, suppressed=1)


def test_a_taken_port_is_a_config_error(db: Engine) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        with pytest.raises(ConfigError, match="cannot listen"):
            BounceListener(db, port=taken.getsockname()[1], keyring=KEYRING).start()


# -- the CLI -------------------------------------------------------------------------------


class Obj:
    def __init__(self, db: Engine) -> None:
        self.db = db


@pytest.fixture
def keyless_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.delenv("MAILKIT_SECRET_KEYS", raising=False)
    monkeypatch.delenv("MAILKIT_SECRET_FILE", raising=False)
    yield


def test_cli_ingest_and_list_rejects(
    sqlite_db: Engine, sqlite_url: str, tmp_path: Path, keyless_env: None
) -> None:
    add_contacts(sqlite_db)
    sent = send_spring(sqlite_db)
    keyring = load_keyring(sqlite_url)  # the workspace key, as the CLI will load it
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "hard.eml").write_bytes(
        render_fixture("postfix_hard.eml", sent[RECIPIENTS[0]], keyring)
    )
    (folder / "junk.eml").write_bytes(b"")
    runner = CliRunner()
    result = runner.invoke(bounces, ["ingest", str(folder), "--json"], obj=Obj(sqlite_db))
    assert result.exit_code == 0, result.output
    data: dict[str, Any] = json.loads(result.output)
    assert (data["seen"], data["hard"], data["rejected"], data["suppressed"]) == (2, 1, 1, 1)

    again = runner.invoke(bounces, ["ingest", str(folder)], obj=Obj(sqlite_db))
    assert again.exit_code == 0 and "2 seen before" in again.output

    listed = runner.invoke(bounces, ["list-rejects", "--json"], obj=Obj(sqlite_db))
    rejects = json.loads(listed.output)
    assert rejects["total"] == 1 and rejects["rejects"][0]["reason"] == "unparseable: empty message"
    plain = runner.invoke(bounces, ["list-rejects"], obj=Obj(sqlite_db))
    assert "1 messages kept aside" in plain.output and "junk.eml" in plain.output

    usage = runner.invoke(bounces, ["ingest"], obj=Obj(sqlite_db))
    assert usage.exit_code == 2
