"""One campaign sent from several forked processes: shares, exactly once, shared preflight."""

from __future__ import annotations

import gc
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
from sqlalchemy import Engine, select
from test_dispatch_support import FakeClock, addresses, assert_exactly_once, make_campaign

from mailkit.campaigns import create_campaign, load_campaign
from mailkit.contacts import import_contacts
from mailkit.dispatch import DEFAULT_PACING, PacingRule, count_states, send_campaign
from mailkit.dispatch.parallel import _frozen_heap, build_shares
from mailkit.errors import ConfigError, PreflightError
from mailkit.sink import FaultPlan, Sink
from mailkit.storage import open_db
from mailkit.storage.schema import messages
from mailkit.templates import compile_template, load_template, save_template

SEND_OPTIONS = ("--processes", "2", "--concurrency", "4", "--json")

pytestmark = pytest.mark.skipif(
    not hasattr(os, "fork"), reason="processes > 1 needs POSIX fork (not on this platform)"
)


@pytest.fixture(autouse=True)
def _no_dkim_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("MAILKIT_DKIM_DOMAIN", "MAILKIT_DKIM_SELECTOR", "MAILKIT_DKIM_KEY"):
        monkeypatch.delenv(name, raising=False)


# -- the shares ----------------------------------------------------------------------------


def test_shares_keep_the_totals_and_give_each_paced_domain_to_one_sender() -> None:
    own = {"example.co.jp": PacingRule(max_connections=3, per_minute=90)}
    default = PacingRule(max_connections=16, per_minute=1000)
    shares = build_shares(3, 16, own, default)
    assert [s.concurrency for s in shares] == [6, 5, 5]
    ruled = {**DEFAULT_PACING, **own}
    for domain, rule in ruled.items():
        owners = [s for s in shares if domain in s.pacing]
        assert len(owners) == 1, domain
        assert owners[0].pacing[domain] == rule
        assert all(domain in s.elsewhere for s in shares if s is not owners[0])
    for share in shares:
        assert set(share.pacing).isdisjoint(share.elsewhere)
        assert set(share.pacing) | share.elsewhere == set(ruled)
        assert share.default == PacingRule(max_connections=5, per_minute=333)


def test_no_more_senders_than_transactions() -> None:
    shares = build_shares(8, 2)
    assert len(shares) == 2 and [s.concurrency for s in shares] == [1, 1]
    assert build_shares(1, 4)[0].elsewhere == frozenset()
    with pytest.raises(ConfigError):
        build_shares(0, 4)


# -- sending -------------------------------------------------------------------------------


def test_three_processes_send_every_recipient_exactly_once(db_url: str) -> None:
    setup = open_db(db_url)
    emails = (
        addresses(90, "example.jp")
        + addresses(40, "docomo.ne.jp", "keitai")
        + addresses(30, "gmail.com", "g")
        + addresses(40, "mail.example.com", "m")
    )
    campaign_id = make_campaign(setup, emails)
    with Sink() as sink:
        result = send_campaign(setup, campaign_id, sink.url, concurrency=6, processes=3)
        states = assert_exactly_once(setup, campaign_id, sink)
    assert result.status == "finished"
    assert result.preflighted == len(emails)
    assert result.attempted == len(emails) and result.outcomes["sent"] == len(emails)
    assert set(states.values()) == {"sent"} and len(states) == len(emails)
    assert count_states(setup, campaign_id)["sent"] == len(emails)
    setup.dispose()


def test_senders_are_forked_with_the_callers_heap_frozen_and_the_caller_is_not() -> None:
    # Frozen objects are never scanned by a sender's garbage collections.
    assert gc.get_freeze_count() == 0
    reader, writer = os.pipe()
    with _frozen_heap():
        pid = os.fork()
        if pid == 0:  # the child reports and leaves at once, as a sender would run and exit
            os.write(writer, str(gc.get_freeze_count()).encode())
            os._exit(0)
    os.close(writer)
    child_frozen = int(os.read(reader, 64))
    os.close(reader)
    os.waitpid(pid, 0)
    assert child_frozen > 1000  # everything imported and built before the fork
    assert gc.get_freeze_count() == 0  # the caller is unfrozen at once
    gc.freeze()  # a caller that froze objects itself is left as it was
    try:
        frozen = gc.get_freeze_count()
        with _frozen_heap():
            pass
        assert gc.get_freeze_count() == frozen
    finally:
        gc.unfreeze()


def test_hard_bounces_and_deferrals_are_recorded_by_every_sender(db: Engine) -> None:
    emails = addresses(120)
    campaign_id = make_campaign(db, emails)
    replies = {emails[7]: "550 5.1.1 user unknown", emails[70]: "451 4.3.0 try later"}
    with Sink(faults=FaultPlan(rcpt_replies=replies)) as sink:
        result = send_campaign(db, campaign_id, sink.url, concurrency=4, processes=2)
        states = assert_exactly_once(db, campaign_id, sink)
    assert states[emails[7]] == "failed" and states[emails[70]] == "deferred"
    assert result.outcomes["bounce"] == 1 and result.outcomes["defer"] == 1
    assert result.outcomes["sent"] == 118 and result.status == "sending"


@pytest.mark.parametrize(
    ("html", "bad", "proven"),
    [
        # A filter: not proven, every member is rendered, in 256-member chunks dealt to forked
        # helpers: the bad one lands in a helper's chunk.
        ("<p>{{ points|number }} ポイント</p>", "たくさん", False),
        # Only fields printed: proven to render for anyone who has them, so this process
        # checks the fields itself, without helpers, and renders whoever lacks one.
        ("<p>{{ points }} ポイント</p>", None, True),
    ],
)
def test_a_shared_preflight_finds_the_one_bad_recipient_and_sends_nothing(
    sqlite_db: Engine, html: str, bad: str | None, proven: bool
) -> None:
    n = 900
    points: list[str | None] = [str(i) for i in range(n)]
    points[600] = bad
    frame = pd.DataFrame(
        {"email": addresses(n), "name": [f"佐藤{i}" for i in range(n)], "points": points}
    )
    import_contacts(sqlite_db, frame, list_name="members")
    save_template(sqlite_db, "pts", subject="{{ name }}様", html=html)
    assert compile_template(load_template(sqlite_db, "pts")).infallible == proven
    campaign = create_campaign(
        sqlite_db,
        "ポイント",
        template="pts",
        segment="list == 'members'",
        from_addr="news@shop.example.jp",
    )
    with Sink() as sink, pytest.raises(PreflightError) as raised:
        send_campaign(sqlite_db, campaign.id, sink.url, concurrency=4, processes=3)
    assert [f.email for f in raised.value.failures] == [addresses(n)[600]]
    if bad is None:
        assert "'points' is undefined" in raised.value.failures[0].error
    assert f"for {n} recipients" in str(raised.value)
    assert sink.count == 0
    assert load_campaign(sqlite_db, campaign.id).status == "draft"
    with sqlite_db.connect() as conn:
        assert conn.execute(select(messages.c.id).limit(1)).first() is None


def test_what_cannot_cross_a_fork_is_refused(sqlite_db: Engine) -> None:
    campaign_id = make_campaign(sqlite_db, addresses(3))
    with pytest.raises(ConfigError, match="clock"):
        send_campaign(sqlite_db, campaign_id, "smtp://127.0.0.1:1", processes=2, clock=FakeClock())
    assert load_campaign(sqlite_db, campaign_id).status == "draft"


#: Every DATA answered after a pause: keeps the senders busy long enough to be stopped.
SLOW_RELAY = FaultPlan(data_delay=0.05)


def start_sending(db_url: str, campaign_id: int, sink: Sink) -> subprocess.Popen[str]:
    """``mailkit campaign send --processes 2`` in a subprocess, once 20 messages arrived."""
    command = ["campaign", "send", str(campaign_id), "--smtp", sink.url, *SEND_OPTIONS]
    proc = subprocess.Popen(
        [sys.executable, "-m", "mailkit.cli", "--db", db_url, *command],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 60
    while sink.count < 20 and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.05)
    assert sink.count >= 20, proc.communicate()[1] if proc.poll() is not None else "too slow"
    return proc


def test_sigterm_to_the_cli_stops_every_sender_cleanly(sqlite_url: str, tmp_path: Path) -> None:
    setup = open_db(sqlite_url)
    emails = addresses(400)
    campaign_id = make_campaign(setup, emails)
    with Sink(faults=SLOW_RELAY) as sink:
        proc = start_sending(sqlite_url, campaign_id, sink)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
        states = assert_exactly_once(setup, campaign_id, sink)
    assert proc.returncode == 0, err
    result = json.loads(out)
    assert result["status"] == "sending"
    # A clean stop: nothing left in flight or unknown, the rest still queued.
    assert "unknown" not in states.values() and "sending" not in states.values()
    assert 20 <= list(states.values()).count("sent") < len(emails)
    assert result["outcomes"]["sent"] == list(states.values()).count("sent")
    setup.dispose()


def _children_of(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry.name))
    return found


def _gone(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return True
    return state in ("Z", "X")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="parent-death signal: Linux")
def test_senders_stop_cleanly_when_the_caller_is_killed_outright(
    sqlite_url: str,
) -> None:
    setup = open_db(sqlite_url)
    emails = addresses(400)
    campaign_id = make_campaign(setup, emails)
    with Sink(faults=SLOW_RELAY) as sink:
        proc = start_sending(sqlite_url, campaign_id, sink)
        senders = _children_of(proc.pid)
        assert len(senders) == 2 and sink.count < len(emails)
        proc.kill()
        proc.communicate(timeout=10)
        deadline = time.monotonic() + 60
        while not all(_gone(pid) for pid in senders) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert all(_gone(pid) for pid in senders), "a sender outlived its killed caller"
        stopped = count_states(setup, campaign_id)
        # They were told to stop (SIGTERM), not killed: nothing in flight, nothing unknown.
        assert stopped.get("sending", 0) == 0 and stopped.get("unknown", 0) == 0
        result = send_campaign(setup, campaign_id, sink.url, concurrency=4)
        states = assert_exactly_once(setup, campaign_id, sink)
    assert result.status == "finished" and set(states.values()) == {"sent"}
    setup.dispose()


def test_resend_unknown_reopens_a_finished_campaign_across_processes(db: Engine) -> None:
    emails = addresses(40)
    campaign_id = make_campaign(db, emails)
    # The sink stores these two, then hangs up without a reply: their outcome is unknown.
    lost = {emails[3], emails[30]}
    with Sink(faults=FaultPlan(drop_after_data=lost)) as first:
        done = send_campaign(db, campaign_id, first.url, concurrency=4, processes=2)
    assert done.status == "finished" and done.ledger["unknown"] == 2
    with Sink() as second:
        again = send_campaign(
            db, campaign_id, second.url, concurrency=4, processes=2, resend_unknown=True
        )
        assert sorted(e.rcpt_tos[0] for e in second.envelopes()) == sorted(lost)
    assert again.status == "finished" and again.ledger["sent"] == 40
    assert again.outcomes["sent"] == 2
