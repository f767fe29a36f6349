"""`kill -9` at random moments, then resume; and two `campaign send` processes at once.

The sender runs as the real `mailkit` command in a subprocess; the sink runs here, so what
arrived is counted independently of what the ledger says.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest
from sqlalchemy import Engine, func, select
from test_dispatch_support import addresses, assert_exactly_once, make_campaign

from mailkit.sink import Sink
from mailkit.storage import open_db
from mailkit.storage.schema import campaigns, messages

CONCURRENCY = 4


@pytest.fixture(autouse=True)
def _no_dkim_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("MAILKIT_DKIM_DOMAIN", "MAILKIT_DKIM_SELECTOR", "MAILKIT_DKIM_KEY"):
        monkeypatch.delenv(name, raising=False)


def start_sender(
    db_url: str, campaign_id: int, smtp_url: str, *extra: str
) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mailkit.cli",
            "--db",
            db_url,
            "campaign",
            "send",
            str(campaign_id),
            "--smtp",
            smtp_url,
            "--concurrency",
            str(CONCURRENCY),
            "--json",
            *extra,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def in_flight(db: Engine, campaign_id: int) -> int:
    with db.connect() as conn:
        return int(
            conn.execute(
                select(func.count()).where(
                    messages.c.campaign_id == campaign_id, messages.c.state == "sending"
                )
            ).scalar_one()
        )


def test_sigkill_at_random_moments_then_resume(db_url: str) -> None:
    db = open_db(db_url)
    total = 400
    campaign_id = make_campaign(db, addresses(total))
    seed = random.randrange(1_000_000)
    rng = random.Random(seed)
    kills = 0
    unknown_before = 0
    with Sink() as sink:
        for _ in range(3):
            proc = start_sender(db_url, campaign_id, sink.url)
            target = sink.count + rng.randint(5, 90)
            deadline = time.monotonic() + 60
            while proc.poll() is None and sink.count < target and time.monotonic() < deadline:
                time.sleep(0.002)
            if proc.poll() is not None:
                break  # it finished before the chosen moment: nothing left to kill
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(30)
            kills += 1
            # A dead sender leaves at most one row in flight per connection.
            assert in_flight(db, campaign_id) <= CONCURRENCY, f"seed {seed}"

            resumed = start_sender(db_url, campaign_id, sink.url, "--concurrency", "1")
            # Let the resume recover the dead run's rows, then kill it too when it sends.
            resume_target = sink.count + rng.randint(1, 10)
            while resumed.poll() is None and sink.count < resume_target:
                time.sleep(0.002)
            if resumed.poll() is None:
                os.kill(resumed.pid, signal.SIGKILL)
                resumed.wait(30)
                kills += 1
            states = assert_exactly_once(db, campaign_id, sink)
            unknown = list(states.values()).count("unknown") + in_flight(db, campaign_id)
            assert unknown - unknown_before <= 2 * CONCURRENCY, f"seed {seed}"
            unknown_before = unknown

        final = start_sender(db_url, campaign_id, sink.url)
        out, err = final.communicate(timeout=120)
        assert final.returncode == 0, err
        result = json.loads(out)
        states = assert_exactly_once(db, campaign_id, sink)

    assert kills >= 1, f"seed {seed}: no kill landed"
    values = list(states.values())
    assert values.count("sent") + values.count("unknown") == total
    assert values.count("unknown") <= kills * CONCURRENCY, f"seed {seed}"
    assert not {"queued", "sending", "deferred"} & set(values)
    assert result["status"] == "finished"
    with db.connect() as conn:
        status = conn.execute(
            select(campaigns.c.status).where(campaigns.c.id == campaign_id)
        ).scalar_one()
    assert status == "finished"
    db.dispose()


def test_two_send_processes_on_one_campaign(sqlite_url: str) -> None:
    db = open_db(sqlite_url)
    campaign_id = make_campaign(db, addresses(300))
    # Started once, so that both processes find the ledger and race only for its rows.
    from mailkit.campaigns import snapshot_campaign

    snapshot_campaign(db, campaign_id)
    with Sink() as sink:
        procs = [start_sender(sqlite_url, campaign_id, sink.url) for _ in range(2)]
        outputs = [p.communicate(timeout=120) for p in procs]
        assert all(p.returncode == 0 for p in procs), [e for _, e in outputs]
        states = assert_exactly_once(db, campaign_id, sink)
        assert sink.count == 300
    attempted = [json.loads(out)["attempted"] for out, _ in outputs]
    assert sum(attempted) == 300
    assert set(states.values()) == {"sent"}
    db.dispose()


def test_sigterm_stops_cleanly_and_resume_sends_the_rest(sqlite_url: str) -> None:
    db = open_db(sqlite_url)
    campaign_id = make_campaign(db, addresses(400))
    with Sink() as sink:
        proc = start_sender(sqlite_url, campaign_id, sink.url)
        deadline = time.monotonic() + 60
        while proc.poll() is None and sink.count < 30 and time.monotonic() < deadline:
            time.sleep(0.002)
        stopped_early = proc.poll() is None
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err
        if stopped_early:
            result = json.loads(out)
            assert result["note"] and "SIGTERM" in result["note"]
            assert result["status"] == "sending"
        # A clean stop leaves nothing in flight and nothing unknown.
        assert in_flight(db, campaign_id) == 0
        states = assert_exactly_once(db, campaign_id, sink)
        assert "unknown" not in states.values()
        final = start_sender(sqlite_url, campaign_id, sink.url)
        final.communicate(timeout=120)
        states = assert_exactly_once(db, campaign_id, sink)
        assert sink.count == 400 and set(states.values()) == {"sent"}
    db.dispose()
