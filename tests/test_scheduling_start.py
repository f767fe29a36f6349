"""Starting a due draft: one preflight however many workers find it, and a dead claimer's
start taken over once its claim runs out.

Real `mailkit worker` processes on both backends, the embedded sink counting what arrives, and
the start claim read from the database. The templates loop over the name so that a preflight
takes a noticeable time: long enough for every worker to find the draft while it runs, and
to kill a claimer in the middle of it.
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
from pathlib import Path

import pytest
from sqlalchemy import Engine, func, select
from test_dispatch_support import FakeClock, addresses, assert_exactly_once, make_campaign

from mailkit.dispatch import SendResult, send_campaign
from mailkit.dispatch.starting import START_CLAIM, claim_start, load_start_claim, renew_start
from mailkit.errors import PreflightError
from mailkit.scheduling import schedule_campaign
from mailkit.sink import Sink
from mailkit.storage import open_db
from mailkit.storage.schema import messages, utcnow

WORKERS = 4
READY = "SIGTERM or Ctrl-C stops it"


def slow_html(loops: int) -> str:
    """A template whose rendering costs about ``loops`` name substitutions per recipient."""
    return "<p>{% for i in range(" + str(loops) + ") %}{{ name }} {% endfor %}様</p>"


pytestmark = pytest.mark.usefixtures("no_settings_from_env")


def start_worker(db_url: str, smtp_url: str, log: Path) -> subprocess.Popen[str]:
    """A `mailkit worker --json` subprocess: the summary on stdout, the rest in ``log``."""
    with log.open("w") as errors:
        return subprocess.Popen(
            [
                *(sys.executable, "-m", "mailkit.cli", "--db", db_url, "worker"),
                *("--smtp", smtp_url, "--concurrency", "2", "--poll", "0.1", "--json"),
            ],
            stdout=subprocess.PIPE,
            stderr=errors,
            text=True,
        )


def wait_until_ready(procs: list[subprocess.Popen[str]], logs: list[Path]) -> None:
    """Until every worker says its signal handlers are in place (it is polling by then)."""
    deadline = time.monotonic() + 60
    while not all(READY in log.read_text() for log in logs):
        for proc, log in zip(procs, logs, strict=True):
            assert proc.poll() is None, log.read_text()
        assert time.monotonic() < deadline, [log.read_text() for log in logs]
        time.sleep(0.05)


def ledger_size(db: Engine, campaign_id: int) -> int:
    with db.connect() as conn:
        return int(
            conn.execute(
                select(func.count()).where(messages.c.campaign_id == campaign_id)
            ).scalar_one()
        )


def owner_pid(owner: str | None) -> int:
    assert owner is not None
    return int(owner.split(":")[1])


def test_workers_preflight_a_due_draft_once_and_share_its_sending(
    db_url: str, tmp_path: Path
) -> None:
    db = open_db(db_url)
    recipients = 600
    campaign_id = make_campaign(db, addresses(recipients), html=slow_html(400))
    logs = [tmp_path / f"worker{i}.log" for i in range(WORKERS)]
    with Sink() as sink:
        procs = [start_worker(db_url, sink.url, log) for log in logs]
        try:
            wait_until_ready(procs, logs)
            # Due only now that every worker polls: they all find it within one poll.
            schedule_campaign(db, campaign_id, utcnow())
            deadline = time.monotonic() + 180
            while load_start_claim(db, campaign_id).status != "finished":
                assert time.monotonic() < deadline, [log.read_text()[-2000:] for log in logs]
                for proc, log in zip(procs, logs, strict=True):
                    assert proc.poll() is None, log.read_text()
                time.sleep(0.05)
            for proc in procs:
                proc.send_signal(signal.SIGTERM)
            outputs = [proc.communicate(timeout=60)[0] for proc in procs]
        finally:
            for proc in procs:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait(30)
        states = assert_exactly_once(db, campaign_id, sink)
        assert sink.count == recipients
    assert set(states.values()) == {"sent"} and len(states) == recipients

    summaries = {proc.pid: json.loads(out) for proc, out in zip(procs, outputs, strict=True)}
    preflights = {pid: s["preflights"].get(str(campaign_id), 0) for pid, s in summaries.items()}
    assert sum(preflights.values()) == 1, preflights  # one preflight among four workers
    (starter,) = [pid for pid, n in preflights.items() if n]
    claim = load_start_claim(db, campaign_id)
    assert owner_pid(claim.owner) == starter and claim.until is None
    assert sum(s["outcomes"]["sent"] for s in summaries.values()) == recipients
    db.dispose()


def test_a_claimer_killed_in_its_preflight_is_taken_over_when_its_claim_runs_out(
    db_url: str, tmp_path: Path
) -> None:
    db = open_db(db_url)
    recipients = 1500
    campaign_id = make_campaign(db, addresses(recipients), html=slow_html(1000))
    schedule_campaign(db, campaign_id, utcnow())
    log = tmp_path / "victim.log"
    with Sink() as sink:
        victim = start_worker(db_url, sink.url, log)
        try:
            deadline = time.monotonic() + 60
            while load_start_claim(db, campaign_id).owner is None:
                assert victim.poll() is None and time.monotonic() < deadline, log.read_text()
                time.sleep(0.01)
            time.sleep(0.3)  # into the rendering
            os.kill(victim.pid, signal.SIGKILL)
            victim.wait(30)
        finally:
            if victim.poll() is None:
                victim.kill()
                victim.wait(30)
        dead = load_start_claim(db, campaign_id)
        # Killed mid-start: no ledger, and a claim that still holds.
        assert dead.status == "draft" and ledger_size(db, campaign_id) == 0, log.read_text()
        assert owner_pid(dead.owner) == victim.pid
        assert dead.until is not None and dead.until > utcnow()

        # The injected clock's sleeps are instant: waiting costs no real time.
        clock = FakeClock(utcnow())
        short = START_CLAIM.total_seconds() / 4
        early = send_campaign(db, campaign_id, sink.url, clock=clock, max_wait=short)
        assert (early.status, early.preflighted, early.attempted) == ("draft", 0, 0)
        assert early.note is not None and "being started" in early.note and dead.owner in early.note
        assert clock.slept >= short and ledger_size(db, campaign_id) == 0 and sink.count == 0

        result = send_campaign(db, campaign_id, sink.url, clock=clock, max_wait=3600)
        assert result.status == "finished" and result.preflighted == recipients
        # It took over only once the dead claim had run out, not before.
        assert clock.now() >= dead.until
        assert clock.slept < 2 * START_CLAIM.total_seconds()
        states = assert_exactly_once(db, campaign_id, sink)
        assert sink.count == recipients and set(states.values()) == {"sent"}
    taken = load_start_claim(db, campaign_id)
    assert owner_pid(taken.owner) == os.getpid() and taken.until is None
    db.dispose()


def test_concurrent_sends_of_a_draft_preflight_it_once(db_url: str) -> None:
    db = open_db(db_url)
    recipients = 300
    campaign_id = make_campaign(db, addresses(recipients), html=slow_html(400))
    results: list[SendResult] = []
    errors: list[BaseException] = []
    gate = threading.Barrier(3)

    def send() -> None:
        engine = open_db(db_url, migrate=False)
        try:
            gate.wait()
            results.append(send_campaign(engine, campaign_id, sink.url, concurrency=2))
        except BaseException as exc:
            errors.append(exc)
        finally:
            engine.dispose()

    with Sink() as sink:
        threads = [threading.Thread(target=send) for _ in range(3)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(180)
        assert not errors, errors
        states = assert_exactly_once(db, campaign_id, sink)
    assert len(results) == 3
    assert collections.Counter(r.preflighted for r in results) == {recipients: 1, 0: 2}
    # Whichever sent the last row finished it; the others may have stopped just before.
    assert load_start_claim(db, campaign_id).status == "finished"
    assert sink.count == recipients and set(states.values()) == {"sent"}
    db.dispose()


def test_a_failed_preflight_releases_the_claim(db: Engine) -> None:
    campaign_id = make_campaign(db, addresses(3), subject="{{ missing.attr }}")
    with Sink() as sink, pytest.raises(PreflightError):
        send_campaign(db, campaign_id, sink.url, max_wait=0)
    claim = load_start_claim(db, campaign_id)
    assert (claim.status, claim.owner, claim.until) == ("draft", None, None)
    assert ledger_size(db, campaign_id) == 0


def test_start_claim_expiry_is_renewed_while_the_claimer_works(db: Engine) -> None:
    campaign_id = make_campaign(db, addresses(2))
    now = utcnow()
    assert claim_start(db, campaign_id, "host:1:a", now=now)
    assert not claim_start(db, campaign_id, "host:2:b", now=now + START_CLAIM / 2)
    assert renew_start(db, campaign_id, "host:1:a", now=now + START_CLAIM / 2)
    # Renewed: still held past the first expiry, free after the renewed one.
    assert not claim_start(db, campaign_id, "host:2:b", now=now + START_CLAIM)
    assert claim_start(db, campaign_id, "host:2:b", now=now + START_CLAIM * 1.5)
    assert not renew_start(db, campaign_id, "host:1:a", now=now + START_CLAIM * 1.5)
    assert load_start_claim(db, campaign_id).owner == "host:2:b"
