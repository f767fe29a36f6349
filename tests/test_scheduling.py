"""Scheduling: send_at, run_due (also overlapping, also from the command line), windows."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from datetime import datetime, time, timedelta
from zoneinfo import ZoneInfo

import pytest
from sqlalchemy import Engine
from test_dispatch_support import FakeClock, addresses, assert_exactly_once, make_campaign

from mailkit.campaigns import load_campaign
from mailkit.dispatch import pause_campaign, send_campaign
from mailkit.errors import CampaignError, ConfigError
from mailkit.scheduling import (
    DueRun,
    SendingWindow,
    find_due_campaigns,
    format_local,
    run_due,
    schedule_campaign,
    set_sending_window,
)
from mailkit.sink import Sink
from mailkit.storage import open_db
from mailkit.storage.schema import utcnow

TOKYO = ZoneInfo("Asia/Tokyo")


@pytest.fixture(autouse=True)
def _no_dkim_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("MAILKIT_DKIM_DOMAIN", "MAILKIT_DKIM_SELECTOR", "MAILKIT_DKIM_KEY"):
        monkeypatch.delenv(name, raising=False)


def test_window_open_and_next_open_in_tokyo() -> None:
    window = SendingWindow(time(9), time(20))
    assert window.is_open(datetime(2026, 4, 1, 9, 0, tzinfo=TOKYO))
    assert not window.is_open(datetime(2026, 4, 1, 20, 0, tzinfo=TOKYO))
    assert not window.is_open(datetime(2026, 4, 1, 8, 59, tzinfo=TOKYO))
    late = datetime(2026, 4, 1, 21, 30, tzinfo=TOKYO)
    assert window.next_open(late) == datetime(2026, 4, 2, 9, 0, tzinfo=TOKYO)
    early = datetime(2026, 4, 1, 6, 0, tzinfo=TOKYO)
    assert window.next_open(early) == datetime(2026, 4, 1, 9, 0, tzinfo=TOKYO)
    overnight = SendingWindow(time(22), time(6))
    assert overnight.is_open(datetime(2026, 4, 1, 23, 0, tzinfo=TOKYO))
    assert overnight.is_open(datetime(2026, 4, 1, 5, 0, tzinfo=TOKYO))
    assert not overnight.is_open(datetime(2026, 4, 1, 12, 0, tzinfo=TOKYO))
    assert (
        format_local(datetime(2026, 4, 1, 0, 0, tzinfo=ZoneInfo("UTC"))) == "2026-04-01 09:00 JST"
    )


def test_schedule_needs_an_aware_time_and_a_draft(sqlite_db: Engine) -> None:
    campaign_id = make_campaign(sqlite_db, addresses(2))
    with pytest.raises(CampaignError, match="timezone-aware"):
        schedule_campaign(sqlite_db, campaign_id, datetime(2026, 4, 1, 9, 0))
    with pytest.raises(ConfigError, match="HH:MM"):
        set_sending_window(sqlite_db, campaign_id, "9am", "20:00")
    with pytest.raises(ConfigError, match="time zone"):
        set_sending_window(sqlite_db, campaign_id, "09:00", "20:00", timezone="Mars/Olympus")


def test_run_due_sends_what_is_due_and_nothing_else(sqlite_db: Engine) -> None:
    db = sqlite_db
    now = utcnow()
    due = make_campaign(db, addresses(5, prefix="due"), name="due")
    schedule_campaign(db, due, now - timedelta(minutes=1))
    future = make_campaign(db, addresses(5, prefix="future"), name="future")
    schedule_campaign(db, future, now + timedelta(hours=1))
    make_campaign(db, addresses(5, prefix="draft"), name="draft")  # never scheduled
    with Sink() as sink:
        runs = run_due(db, sink.url)
        assert [r.campaign.id for r in runs] == [due]
        assert runs[0].result is not None and runs[0].result.status == "finished"
        assert sink.count == 5
        assert run_due(db, sink.url) == []  # nothing due any more
    assert load_campaign(db, future).status == "draft"


def test_a_campaign_due_long_ago_needs_confirmation(sqlite_db: Engine) -> None:
    db = sqlite_db
    campaign_id = make_campaign(db, addresses(4))
    schedule_campaign(db, campaign_id, utcnow() - timedelta(days=30))
    with Sink() as sink:
        (skipped,) = run_due(db, sink.url)
        assert skipped.result is None and skipped.skipped is not None
        assert f"--confirm-late {campaign_id}" in skipped.skipped
        assert sink.count == 0
        (confirmed,) = run_due(db, sink.url, confirm_late=[campaign_id])
        assert confirmed.result is not None and confirmed.result.status == "finished"
        assert sink.count == 4


def test_run_due_resumes_due_retries_but_not_paused_campaigns(sqlite_db: Engine) -> None:
    db = sqlite_db
    emails = addresses(3)
    retrying = make_campaign(db, emails, name="retrying")
    clock = FakeClock(utcnow())
    with Sink(rcpt_replies={emails[0]: "451 4.3.0 later"}, faults=None) as sink:
        send_campaign(db, retrying, sink.url, clock=clock)
    paused = make_campaign(db, addresses(3, prefix="p"), name="paused")
    with Sink(rcpt_replies={"p00001@example.jp": "450 4.2.0 later"}) as sink:
        send_campaign(db, paused, sink.url, clock=clock)
    pause_campaign(db, paused)
    assert find_due_campaigns(db, now=clock.now()) == []  # retries not due yet
    clock.advance(timedelta(minutes=5))
    with Sink() as sink:
        runs = run_due(db, sink.url, now=clock.now(), clock=clock)
        assert [r.campaign.id for r in runs] == [retrying]
        assert [e.rcpt_tos for e in sink.envelopes()] == [(emails[0],)]
    assert load_campaign(db, retrying).status == "finished"
    assert load_campaign(db, paused).status == "paused"


def test_outside_the_sending_window_nothing_is_claimed(sqlite_db: Engine) -> None:
    db = sqlite_db
    campaign_id = make_campaign(db, addresses(4))
    set_sending_window(db, campaign_id, "09:00", "20:00")
    night = FakeClock(datetime(2026, 4, 1, 21, 0, tzinfo=TOKYO).astimezone(ZoneInfo("UTC")))
    schedule_campaign(db, campaign_id, night.now() - timedelta(minutes=5))
    with Sink() as sink:
        (run,) = run_due(db, sink.url, now=night.now(), clock=night)
        assert run.result is not None and run.result.attempted == 0
        assert run.result.note is not None and "2026-04-02 09:00 JST" in run.result.note
        assert run.result.ledger["queued"] == 4 and sink.count == 0
        morning = FakeClock(datetime(2026, 4, 2, 9, 1, tzinfo=TOKYO).astimezone(ZoneInfo("UTC")))
        (run,) = run_due(db, sink.url, now=morning.now(), clock=morning)
        assert run.result is not None and run.result.status == "finished"
        assert sink.count == 4


def test_overlapping_run_due_calls_cooperate(sqlite_url: str) -> None:
    setup = open_db(sqlite_url)
    campaign_id = make_campaign(setup, addresses(120))
    schedule_campaign(setup, campaign_id, utcnow() - timedelta(seconds=1))
    runs: list[list[DueRun]] = []
    errors: list[BaseException] = []

    def cron() -> None:
        engine = open_db(sqlite_url, migrate=False)
        try:
            runs.append(run_due(engine, sink.url, concurrency=2))
        except BaseException as exc:
            errors.append(exc)
        finally:
            engine.dispose()

    with Sink() as sink:
        threads = [threading.Thread(target=cron) for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert not errors, errors
        states = assert_exactly_once(setup, campaign_id, sink)
    assert set(states.values()) == {"sent"} and len(states) == 120
    assert load_campaign(setup, campaign_id).status == "finished"
    setup.dispose()


def mailkit(db_url: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mailkit.cli", "--db", db_url, *args],
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_cli_schedule_run_due_and_pause(sqlite_url: str) -> None:
    db = open_db(sqlite_url)
    campaign_id = str(make_campaign(db, addresses(3)))
    old = (utcnow() - timedelta(days=3)).astimezone(TOKYO).replace(tzinfo=None).isoformat()
    scheduled = mailkit(sqlite_url, "campaign", "schedule", campaign_id, "--at", old, "--json")
    assert scheduled.returncode == 0, scheduled.stderr
    with Sink() as sink:
        skipped = mailkit(sqlite_url, "run-due", "--smtp", sink.url, "--json")
        assert skipped.returncode == 1 and sink.count == 0
        assert json.loads(skipped.stdout)["runs"][0]["skipped"]
        sent = mailkit(
            sqlite_url, "run-due", "--smtp", sink.url, "--confirm-late", campaign_id, "--json"
        )
        assert sent.returncode == 0, sent.stderr
        assert json.loads(sent.stdout)["runs"][0]["result"]["status"] == "finished"
        assert sink.count == 3
    refused = mailkit(sqlite_url, "campaign", "pause", campaign_id)
    assert refused.returncode == 1 and "only a sending campaign" in refused.stderr
    db.dispose()
