"""`mailkit worker`: long-running senders sharing campaigns through the ledger.

The big one runs four real `mailkit worker` processes on one 20,000-recipient campaign in a
PostgreSQL workspace, SIGKILLs one of them midway and lets the others finish; the sink runs here,
so what arrived is counted independently of what the ledger says. The smaller ones check the
single pass, the clean stop while idle, and the library loop stopped from another thread.
"""

from __future__ import annotations

import collections
import json
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import pandas as pd
import pytest
from sqlalchemy import Engine, func, select
from test_dispatch_support import addresses, assert_exactly_once, make_campaign

from mailkit.campaigns import create_campaign
from mailkit.contacts import import_contacts
from mailkit.dispatch import run_worker
from mailkit.scheduling import schedule_campaign
from mailkit.sink import Sink
from mailkit.storage import open_db
from mailkit.storage.schema import PENDING_STATES, campaigns, messages
from mailkit.templates import save_template

RECIPIENTS = 20_000
WORKERS = 4
CONCURRENCY = 4  # per worker: the killed one may leave at most this many rows unknown
KILL_AT = 0.3  # of the recipients received at the sink
DEADLINE = 240.0  # seconds for the whole campaign; it takes about a minute on 2 cores
# Not in the carrier table: the default rule (16 connections, no rate limit) applies.
DOMAINS = ("example.jp", "example.co.jp", "example.ne.jp", "example.or.jp", "example.ac.jp")


pytestmark = pytest.mark.usefixtures("no_settings_from_env")


def start_worker(db_url: str, smtp_url: str, log: Path, *extra: str) -> subprocess.Popen[str]:
    """A `mailkit worker` subprocess; stdout is piped, stderr goes to ``log``."""
    with log.open("w") as errors:
        return subprocess.Popen(
            [
                sys.executable,
                "-m",
                "mailkit.cli",
                "--db",
                db_url,
                "worker",
                "--smtp",
                smtp_url,
                "--concurrency",
                str(CONCURRENCY),
                *extra,
            ],
            stdout=subprocess.PIPE,
            stderr=errors,
            text=True,
        )


def build_big_campaign(db: Engine, n: int) -> int:
    """``n`` contacts over a few domains, a template, and a draft scheduled for now."""
    emails = [f"member{i:06d}@{DOMAINS[i % len(DOMAINS)]}" for i in range(n)]
    frame = pd.DataFrame(
        {
            "email": emails,
            "name": [f"佐藤{i}" for i in range(n)],
            "prefecture": ["大阪府", "東京都", "福岡県"] * (n // 3) + ["北海道"] * (n % 3),
        }
    )
    report = import_contacts(db, frame, list_name="会員")
    assert report.added == n and not report.rejected
    save_template(db, "秋", subject="{{ name }}様へ 秋のご案内", html="<p>{{ name }} 様</p>")
    campaign = create_campaign(
        db,
        "秋",
        template="秋",
        segment="list == '会員'",
        from_addr="ショップ <news@shop.example.jp>",
        tracking=False,
    )
    schedule_campaign(db, campaign.id, datetime.now(UTC))
    return campaign.id


@dataclass(frozen=True)
class Snapshot:
    status: str
    pending: int


def snapshot(db: Engine, campaign_id: int) -> Snapshot:
    """The campaign's status, then (read after it) how many of its rows are pending."""
    with db.connect() as conn:
        status = conn.execute(
            select(campaigns.c.status).where(campaigns.c.id == campaign_id)
        ).scalar_one()
        pending = conn.execute(
            select(func.count()).where(
                messages.c.campaign_id == campaign_id, messages.c.state.in_(PENDING_STATES)
            )
        ).scalar_one()
    return Snapshot(status, int(pending))


def lease_holders(db: Engine, campaign_id: int) -> dict[int, tuple[int, int]]:
    """pid → (rows it has ``sending``, rows it holds leased) for the workers on this host."""
    m = messages.c
    with db.connect() as conn:
        rows = conn.execute(
            select(m.lease_owner, m.state, func.count())
            .where(m.campaign_id == campaign_id, m.lease_owner.is_not(None))
            .group_by(m.lease_owner, m.state)
        ).all()
    held: dict[int, tuple[int, int]] = {}
    for owner, state, count in rows:
        pid = int(owner.split(":")[1])
        sending, leased = held.get(pid, (0, 0))
        held[pid] = (sending + (count if state == "sending" else 0), leased + count)
    return held


def fail_with_logs(message: str, logs: list[Path]) -> None:
    tails = "\n".join(f"--- {log.name}\n{log.read_text()[-2000:]}" for log in logs)
    pytest.fail(f"{message}\n{tails}")


def test_four_workers_share_a_campaign_and_survive_a_sigkill(pg_url: str, tmp_path: Path) -> None:
    db = open_db(pg_url)
    campaign_id = build_big_campaign(db, RECIPIENTS)
    logs = [tmp_path / f"worker{i}.log" for i in range(WORKERS)]
    with Sink() as sink:
        procs = [start_worker(pg_url, sink.url, log, "--poll", "0.2", "--json") for log in logs]
        by_pid = {proc.pid: proc for proc in procs}
        victim: subprocess.Popen[str] | None = None
        victim_held = (0, 0)
        finished_seen = False
        deadline = time.monotonic() + DEADLINE
        try:
            while True:
                if time.monotonic() > deadline:
                    fail_with_logs(
                        f"the campaign did not finish in {DEADLINE:.0f} s: {sink.count} of "
                        f"{RECIPIENTS} received, {snapshot(db, campaign_id)}",
                        logs,
                    )
                for proc in procs:
                    if proc is not victim and proc.poll() is not None:
                        fail_with_logs(f"worker {proc.pid} exited ({proc.returncode})", logs)
                state = snapshot(db, campaign_id)
                # Finished is final here, and pending was read after the status.
                assert state.status != "finished" or state.pending == 0, state
                if state.status == "finished":
                    finished_seen = True
                    break
                if victim is None and sink.count >= KILL_AT * RECIPIENTS:
                    # Kill a worker in the middle of its work: the one with rows in flight
                    # (else the most rows claimed) right now.
                    held = lease_holders(db, campaign_id)
                    ours = {pid: h for pid, h in held.items() if pid in by_pid}
                    assert ours, f"no worker holds rows at {sink.count} received: {held}"
                    pid = max(ours, key=lambda p: ours[p])
                    victim, victim_held = by_pid[pid], ours[pid]
                    os.kill(pid, signal.SIGKILL)
                    victim.wait(30)  # reaped: its peers on this host now see it is gone
                time.sleep(0.05)
            received_at_finish = sink.count
            survivors = [proc for proc in procs if proc is not victim]
            for proc in survivors:
                proc.send_signal(signal.SIGTERM)
            outputs = [proc.communicate(timeout=60)[0] for proc in survivors]
        finally:
            for proc in procs:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait(30)
        envelopes = sink.envelopes()

    assert victim is not None, "the campaign finished before a worker could be killed"
    assert finished_seen
    assert victim_held[1] > 0  # it held claimed rows when it died: a real midway kill
    assert sink.count == received_at_finish  # nothing arrived after the campaign finished

    # Each survivor stopped cleanly on SIGTERM and reported what it did.
    for proc in survivors:
        assert proc.returncode == 0, f"worker {proc.pid} exited {proc.returncode}"
    summaries = [json.loads(out) for out in outputs]
    assert all(s["stopped_by"] == "SIGTERM" for s in summaries), summaries
    assert all(s["outcomes"]["unknown"] == 0 for s in summaries), summaries

    with db.connect() as conn:
        rows = conn.execute(
            select(messages.c.email, messages.c.state, messages.c.smtp_reply).where(
                messages.c.campaign_id == campaign_id
            )
        ).all()
        status, finished_at = conn.execute(
            select(campaigns.c.status, campaigns.c.finished_at).where(campaigns.c.id == campaign_id)
        ).one()
    db.dispose()
    assert status == "finished" and finished_at is not None
    states = {r.email: r.state for r in rows}
    assert len(states) == RECIPIENTS

    counts: collections.Counter[str] = collections.Counter(
        rcpt.lower() for envelope in envelopes for rcpt in envelope.rcpt_tos
    )
    twice = {email: n for email, n in counts.items() if n > 1}
    assert not twice, f"received more than once: {list(twice.items())[:10]}"
    assert set(counts) <= set(states)
    assert set(states.values()) <= {"sent", "unknown"}, collections.Counter(states.values())

    sent = {email for email, state in states.items() if state == "sent"}
    unknown = {email for email, state in states.items() if state == "unknown"}
    missing = [email for email in sent if counts[email] != 1]
    assert not missing, f"{len(missing)} sent rows did not arrive exactly once: {missing[:10]}"
    # Only the killed worker's rows in flight are unknown: at most one per connection, each
    # one that the sink either stored before the kill or never got.
    assert len(unknown) <= CONCURRENCY, sorted(unknown)
    unknown_received = {email for email in unknown if counts[email] == 1}
    unknown_not_received = unknown - unknown_received
    assert sum(counts.values()) == len(sent) + len(unknown_received)
    assert set(states) - set(counts) == unknown_not_received
    assert all(
        r.smtp_reply and "outcome unknown" in r.smtp_reply for r in rows if r.state == "unknown"
    )
    # What the survivors report sending fits in what the ledger holds; the rest is the victim's.
    survivors_sent = sum(s["outcomes"]["sent"] for s in summaries)
    assert len(sent) >= survivors_sent
    print(
        f"\nkilled worker {victim.pid} holding {victim_held[1]} rows ({victim_held[0]} in "
        f"flight); unknown: {len(unknown_received)} received, {len(unknown_not_received)} not; "
        f"survivors sent {survivors_sent}, the killed worker {len(sent) - survivors_sent}"
    )


def test_worker_once_sends_what_is_due_and_exits(db_url: str, tmp_path: Path) -> None:
    db = open_db(db_url)
    campaign_id = make_campaign(db, addresses(60))
    schedule_campaign(db, campaign_id, datetime.now(UTC))
    with Sink() as sink:
        proc = start_worker(db_url, sink.url, tmp_path / "w.log", "--once", "--json")
        out, _ = proc.communicate(timeout=120)
        assert proc.returncode == 0, (tmp_path / "w.log").read_text()
        assert sink.count == 60
    summary = json.loads(out)
    assert summary["stopped_by"] == "once" and summary["passes"] == 1
    assert summary["outcomes"]["sent"] == 60 and summary["finished"] == [campaign_id]
    assert snapshot(db, campaign_id) == Snapshot("finished", 0)
    db.dispose()


def test_worker_stops_cleanly_on_sigterm_while_idle(sqlite_url: str, tmp_path: Path) -> None:
    open_db(sqlite_url).dispose()
    with Sink() as sink:
        # A poll far longer than the wait below: only the signal can end the sleep in time.
        proc = start_worker(sqlite_url, sink.url, tmp_path / "w.log", "--poll", "3600")
        assert proc.stdout is not None
        ready = proc.stdout.readline()  # printed once the signal handlers are in place
        assert "SIGTERM or Ctrl-C stops it" in ready, (tmp_path / "w.log").read_text()
        assert "smtp://127.0.0.1:" in ready
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, (tmp_path / "w.log").read_text()
    assert "worker stopped (SIGTERM) after 1 pass: 0 messages attempted" in out


def test_run_worker_stops_from_another_thread(db: Engine) -> None:
    campaign_id = make_campaign(db, addresses(40))
    schedule_campaign(db, campaign_id, datetime.now(UTC))
    stop = threading.Event()
    summaries = []
    with Sink() as sink:
        # Not the main thread (as in Jupyter, where the loop runs in a helper thread): no
        # signal handlers there, the event is the way to stop it.
        thread = threading.Thread(
            target=lambda: summaries.append(
                run_worker(db, sink.url, poll=0.05, stop=stop, concurrency=2)
            )
        )
        thread.start()
        deadline = time.monotonic() + 60
        while snapshot(db, campaign_id).status != "finished" and time.monotonic() < deadline:
            time.sleep(0.05)
        stop.set()
        thread.join(60)
        assert not thread.is_alive()
        assert sink.count == 40
    (summary,) = summaries
    assert summary.stopped_by == "stop"
    assert summary.attempted == 40 and summary.finished == (campaign_id,)


def test_sigterm_mid_campaign_leaves_nothing_in_flight(sqlite_url: str, tmp_path: Path) -> None:
    db = open_db(sqlite_url)
    campaign_id = make_campaign(db, addresses(400))
    schedule_campaign(db, campaign_id, datetime.now(UTC))
    log = tmp_path / "w.log"
    with Sink() as sink:
        proc = start_worker(sqlite_url, sink.url, log, "--poll", "0.2", "--json")
        deadline = time.monotonic() + 60
        while proc.poll() is None and sink.count < 30 and time.monotonic() < deadline:
            time.sleep(0.002)
        assert proc.poll() is None, log.read_text()
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
        assert proc.returncode == 0, log.read_text()
        summary = json.loads(out)
        assert summary["stopped_by"] == "SIGTERM"
        # Messages in flight got their answer; unsent claims went back to the ledger.
        states = assert_exactly_once(db, campaign_id, sink)
        assert not {"sending", "unknown"} & set(states.values())
        assert summary["outcomes"]["sent"] == sink.count
        with db.connect() as conn:
            leased = conn.execute(
                select(func.count()).where(messages.c.lease_owner.is_not(None))
            ).scalar_one()
        assert leased == 0

        rest = start_worker(sqlite_url, sink.url, log, "--once", "--json")
        rest.communicate(timeout=120)
        assert rest.returncode == 0, log.read_text()
        states = assert_exactly_once(db, campaign_id, sink)
        assert sink.count == 400 and set(states.values()) == {"sent"}
    assert snapshot(db, campaign_id) == Snapshot("finished", 0)
    db.dispose()
