"""Interop with a real MTA: a campaign relayed through Postfix arrives intact and DKIM-valid.

The test runs a private Postfix instance (its own config and queue directories, loopback only,
no DNS) whose relayhost is an embedded Sink, sends a small signed campaign through it with
``send_campaign`` and checks every message at the sink. Postfix comes from the Debian package
(``.ci/install-postfix``); without it the test is skipped, unless MAILKIT_REQUIRE_POSTFIX is
set (CI), when it fails instead.
"""

from __future__ import annotations

import email
import email.policy
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from email.message import EmailMessage
from pathlib import Path

import dkim
import pandas as pd
import pytest
from sqlalchemy import Engine, select

from mailkit.campaigns import create_campaign
from mailkit.contacts import import_contacts
from mailkit.dispatch import send_campaign
from mailkit.dkim import DKIMSigner, build_dkim_keypair
from mailkit.sink import Sink
from mailkit.storage.schema import messages
from mailkit.templates import save_template

POSTFIX = shutil.which("postfix") or (
    "/usr/sbin/postfix" if Path("/usr/sbin/postfix").exists() else None
)
DOMAIN = "shop.example.jp"
SELECTOR = "mk2026"
RECIPIENTS = 12
WAIT = 60.0  # seconds: generous upper bound for a loaded CI machine, never slept through

# Only the services a relay needs; no chroot (the queue directory is a fresh temp dir).
MASTER_CF = """\
127.0.0.1:{port} inet n - n - - smtpd
pickup     unix  n - n 60 1 pickup
cleanup    unix  n - n -  0 cleanup
qmgr       unix  n - n 300 1 qmgr
rewrite    unix  - - n -  - trivial-rewrite
bounce     unix  - - n -  0 bounce
defer      unix  - - n -  0 bounce
trace      unix  - - n -  0 bounce
verify     unix  - - n -  1 verify
flush      unix  n - n 1000? 0 flush
proxymap   unix  - - n -  - proxymap
smtp       unix  - - n -  - smtp
relay      unix  - - n -  - smtp
showq      unix  n - n -  - showq
error      unix  - - n -  - error
retry      unix  - - n -  - error
discard    unix  - - n -  - discard
anvil      unix  - - n -  1 anvil
scache     unix  - - n -  1 scache
postlog    unix-dgram n - n - 1 postlogd
"""

MAIN_CF = """\
compatibility_level = 3.6
queue_directory = {root}/queue
data_directory = {root}/data
maillog_file = {root}/maillog
maillog_file_prefixes = {root}
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
myhostname = relay.mailkit.test
mydomain = mailkit.test
myorigin = $myhostname
mydestination =
local_transport = error:local delivery is disabled
alias_maps =
alias_database =
mynetworks = 127.0.0.0/8
smtpd_relay_restrictions = permit_mynetworks, reject
relayhost = [127.0.0.1]:{sink_port}
smtp_tls_security_level = none
smtpd_tls_security_level = none
smtp_dns_support_level = disabled
smtp_host_lookup = native
disable_mime_output_conversion = yes
in_flow_delay = 0
queue_run_delay = 1s
minimal_backoff_time = 1s
maximal_backoff_time = 2s
biff = no
"""


@dataclass(frozen=True)
class Postfix:
    config: Path
    port: int

    @property
    def url(self) -> str:
        return f"smtp://127.0.0.1:{self.port}"

    def run(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(POSTFIX), "-c", str(self.config), *args],
            capture_output=True,
            text=True,
            timeout=60,
        )

    def log(self) -> str:
        path = self.config.parent / "maillog"
        return path.read_text(errors="replace")[-4000:] if path.exists() else "(no maillog)"

    def flush(self) -> None:
        subprocess.run(["postqueue", "-c", str(self.config), "-f"], capture_output=True, timeout=30)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _poll(done: Callable[[], bool], timeout: float = WAIT) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if done():
            return True
        time.sleep(0.05)
    return done()


def _answers_smtp(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2) as conn:
            return conn.recv(64).startswith(b"220")
    except OSError:
        return False


def _master_pid(root: Path) -> int | None:
    try:
        return int((root / "queue" / "pid" / "master.pid").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.fixture
def sink() -> Iterator[Sink]:
    with Sink() as server:
        yield server


@pytest.fixture
def postfix(sink: Sink) -> Iterator[Postfix]:
    """A private, loopback-only Postfix that relays everything to ``sink``."""
    reason = None
    if POSTFIX is None:
        reason = "Postfix is not installed (run .ci/install-postfix)"
    elif os.geteuid() != 0:
        reason = "a private Postfix instance needs root (its daemons drop to the postfix user)"
    if reason is not None:
        if os.environ.get("MAILKIT_REQUIRE_POSTFIX"):
            pytest.fail(reason + " (MAILKIT_REQUIRE_POSTFIX is set)")
        pytest.skip(reason)
    # Not under pytest's tmp_path: its parents are private to root, and the daemons, running
    # as the postfix user, must be able to reach the queue directory.
    root = Path(tempfile.mkdtemp(prefix="mailkit-postfix-"))
    root.chmod(0o755)
    config = root / "etc"
    config.mkdir()
    (root / "queue").mkdir()  # postfix check creates its subdirectories, owned right
    instance = Postfix(config, _free_port())
    (config / "main.cf").write_text(MAIN_CF.format(root=root, sink_port=sink.port))
    (config / "master.cf").write_text(MASTER_CF.format(port=instance.port))
    try:
        checked = instance.run("check")
        assert checked.returncode == 0, f"postfix check failed: {checked.stderr}\n{instance.log()}"
        started = instance.run("start")
        assert started.returncode == 0, f"postfix start failed: {started.stderr}\n{instance.log()}"
        assert _poll(lambda: _answers_smtp(instance.port)), (
            f"Postfix did not answer on port {instance.port}\n{instance.log()}"
        )
        yield instance
    finally:
        pid = _master_pid(root)
        instance.run("stop")
        if pid is not None and not _poll(lambda: not _alive(pid), timeout=20):
            os.kill(pid, signal.SIGKILL)  # the master we started, by its own pid file
        shutil.rmtree(root, ignore_errors=True)


def dns_for(signer: DKIMSigner) -> Callable[..., bytes | None]:
    """A dkimpy ``dnsfunc`` answering from the TXT records we would publish."""
    answers = {
        f"{r.name}.".encode(): "".join(r.strings).encode() for r in signer.render_dns_records()
    }

    def dnsfunc(name: bytes, timeout: int = 5) -> bytes | None:
        return answers.get(name if name.endswith(b".") else name + b".")

    return dnsfunc


def test_campaign_relayed_through_postfix_arrives_intact_and_dkim_valid(
    sqlite_db: Engine, postfix: Postfix, sink: Sink
) -> None:
    db = sqlite_db
    emails = [f"kaiin{i:03d}@example.jp" for i in range(RECIPIENTS)]
    names = {e: f"山田 花子{i}" for i, e in enumerate(emails)}
    frame = pd.DataFrame({"email": emails, "name": [names[e] for e in emails]})
    import_contacts(db, frame)
    save_template(
        db,
        "postfix",
        subject="{{ name }}様へ【春のご案内】",
        html="<p>{{ name }} 様</p><p>春の新作をご案内します。ご覧ください。</p>",
    )
    campaign = create_campaign(
        db,
        "postfix interop",
        template="postfix",
        segment="all",
        from_addr=f"ショップ <news@{DOMAIN}>",
    )
    signer = DKIMSigner(domain=DOMAIN, selector=SELECTOR, rsa_key=build_dkim_keypair())

    result = send_campaign(db, campaign.id, postfix.url, dkim=signer)

    with db.connect() as conn:
        ledger = conn.execute(
            select(messages.c.email, messages.c.state, messages.c.message_id).where(
                messages.c.campaign_id == campaign.id
            )
        ).all()
    assert sorted(state for _, state, _ in ledger) == ["sent"] * RECIPIENTS, result
    if not _poll(lambda: sink.count >= RECIPIENTS, timeout=5):
        postfix.flush()  # ask the queue manager to retry now rather than at its next run
    assert _poll(lambda: sink.count >= RECIPIENTS), (
        f"{sink.count} of {RECIPIENTS} messages reached the sink\n{postfix.log()}"
    )

    dnsfunc = dns_for(signer)
    by_recipient = {}
    for received in sink.envelopes():
        assert len(received.rcpt_tos) == 1, received.rcpt_tos
        assert received.mail_from.endswith("@" + DOMAIN), received.mail_from
        by_recipient[received.rcpt_tos[0]] = received.data
    assert sorted(by_recipient) == sorted(emails)

    for address, _state, message_id in ledger:
        data = by_recipient[address]
        assert dkim.verify(data, dnsfunc=dnsfunc), f"DKIM signature broken in transit for {address}"
        message: EmailMessage = email.message_from_bytes(data, policy=email.policy.default)
        # Postfix adds its one Received header on top and changes nothing else we check.
        assert data.startswith(b"Received: from "), data[:200]
        assert len(message.get_all("Received", [])) == 1
        assert "(Postfix)" in str(message["Received"])
        assert message["Message-ID"] == message_id
        assert message["Subject"] == f"{names[address]}様へ【春のご案内】"
        assert address in str(message["To"])
        assert message["DKIM-Signature"] is not None
        body = message.get_body(preferencelist=("plain",))
        assert body is not None and f"{names[address]} 様" in body.get_content()
