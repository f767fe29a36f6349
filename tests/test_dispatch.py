"""The ledger under real sends: exactly once, cooperation, pause/resume, recovery, backoff."""

from __future__ import annotations

import socket
import threading
from datetime import timedelta

import pytest
from sqlalchemy import Engine, func, select, update
from test_dispatch_support import (
    FakeClock,
    addresses,
    assert_exactly_once,
    ledger,
    make_campaign,
)

from mailkit.dispatch import SendResult, count_states, pause_campaign, send_campaign
from mailkit.dispatch.ledger import claim_rows, new_worker_id, recover_stale_rows
from mailkit.errors import CampaignError
from mailkit.sink import FaultPlan, Sink
from mailkit.storage import open_db
from mailkit.storage.schema import campaigns, events, messages, utcnow


@pytest.fixture(autouse=True)
def _no_dkim_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("MAILKIT_DKIM_DOMAIN", "MAILKIT_DKIM_SELECTOR", "MAILKIT_DKIM_KEY"):
        monkeypatch.delenv(name, raising=False)


def test_every_recipient_exactly_once_and_counts_match(db: Engine, each_event_loop: str) -> None:
    campaign_id = make_campaign(db, addresses(60))
    with Sink() as sink:
        result = send_campaign(db, campaign_id, sink.url, concurrency=4)
        states = assert_exactly_once(db, campaign_id, sink)
    assert result.status == "finished"
    assert set(states.values()) == {"sent"} and len(states) == 60
    assert result.outcomes["sent"] == 60 and result.attempted == 60
    assert count_states(db, campaign_id)["sent"] == 60
    with db.connect() as conn:
        sent_events = conn.execute(
            select(func.count()).where(events.c.campaign_id == campaign_id, events.c.type == "sent")
        ).scalar_one()
        leased = conn.execute(
            select(func.count()).where(messages.c.lease_owner.is_not(None))
        ).scalar_one()
    assert sent_events == 60 and leased == 0
    # A finished campaign sends nothing more.
    with Sink() as again:
        assert send_campaign(db, campaign_id, again.url).attempted == 0
        assert again.count == 0


def test_two_concurrent_senders_share_the_work(db_url: str) -> None:
    setup = open_db(db_url)
    campaign_id = make_campaign(setup, addresses(150))
    setup.dispose()
    results: list[SendResult] = []
    errors: list[BaseException] = []

    def sender() -> None:
        engine = open_db(db_url, migrate=False)  # alembic is not thread-safe
        try:
            results.append(send_campaign(engine, campaign_id, sink.url, concurrency=3))
        except BaseException as exc:
            errors.append(exc)
        finally:
            engine.dispose()

    with Sink() as sink:
        threads = [threading.Thread(target=sender) for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert not errors, errors
        db = open_db(db_url)
        states = assert_exactly_once(db, campaign_id, sink)
    assert len(states) == 150 and set(states.values()) == {"sent"}
    assert sum(r.attempted for r in results) == 150
    assert count_states(db, campaign_id)["sent"] == 150
    db.dispose()


def test_claims_never_overlap_between_workers(db: Engine) -> None:
    campaign_id = make_campaign(db, addresses(30))
    from mailkit.campaigns import snapshot_campaign

    snapshot_campaign(db, campaign_id)
    first, second = new_worker_id(), new_worker_id()
    a = claim_rows(db, campaign_id, first, 20)
    b = claim_rows(db, campaign_id, second, 20)
    assert len(a) == 20 and len(b) == 10
    assert not {r.id for r in a} & {r.id for r in b}
    assert claim_rows(db, campaign_id, new_worker_id(), 20) == []


def test_rows_of_a_dead_worker_become_unknown_and_are_not_resent(db: Engine) -> None:
    campaign_id = make_campaign(db, addresses(10))
    from mailkit.campaigns import snapshot_campaign

    snapshot_campaign(db, campaign_id)
    dead = f"{socket.gethostname()}:{2**22 + 12345}:gone"  # no such pid on this host
    with db.begin() as conn:
        ids = conn.execute(
            select(messages.c.id).where(messages.c.campaign_id == campaign_id).limit(3)
        ).scalars()
        ids = list(ids)
        conn.execute(
            update(messages)
            .where(messages.c.id.in_(ids[:2]))
            .values(state="sending", lease_owner=dead, lease_expires_at=utcnow() + timedelta(1))
        )
        conn.execute(
            update(messages)
            .where(messages.c.id == ids[2])
            .values(lease_owner=dead, lease_expires_at=utcnow() + timedelta(1))
        )
    with Sink() as sink:
        result = send_campaign(db, campaign_id, sink.url)
        states = assert_exactly_once(db, campaign_id, sink)
    assert result.recovered_unknown == 2
    assert list(states.values()).count("unknown") == 2
    assert result.status == "finished"  # unknown rows are decided, not pending
    with Sink() as sink:
        again = send_campaign(db, campaign_id, sink.url, resend_unknown=True)
        assert sink.count == 2
    assert again.ledger["sent"] == 10
    assert recover_stale_rows(db, campaign_id) == 0


def test_pause_is_noticed_by_a_running_sender_and_resume_sends_the_rest(
    sqlite_db: Engine,
) -> None:
    db = sqlite_db
    emails = addresses(40)
    stalled = emails[15]
    campaign_id = make_campaign(db, emails)
    result: list[SendResult] = []
    clock = FakeClock(utcnow())
    with Sink(faults=FaultPlan(stall_at_rcpt={stalled})) as first_sink:
        sink = first_sink
        url = sink.url + "?timeout=1"  # the stalled RCPT times out: that recipient is deferred
        thread = threading.Thread(
            target=lambda: result.append(
                send_campaign(db, campaign_id, url, concurrency=1, clock=clock)
            )
        )
        thread.start()
        for _ in range(20_000):  # bounded poll: the sender reaches the stalled recipient
            if sink.stalled:
                break
            thread.join(0.005)
        assert sink.stalled == 1
        pause_campaign(db, campaign_id, "checking the numbers")
        thread.join(60)
        first = assert_exactly_once(db, campaign_id, sink)
    (paused,) = result
    assert paused.status == "paused" and paused.status_reason == "checking the numbers"
    assert first[stalled] == "deferred"
    assert "sending" not in first.values() and "failed" not in first.values()
    sent_before = list(first.values()).count("sent")
    assert 0 < sent_before < 40
    assert list(first.values()).count("queued") == 40 - sent_before - 1

    clock.advance(timedelta(minutes=6))  # the deferred recipient's retry time has come
    with Sink() as sink:
        resumed = send_campaign(db, campaign_id, sink.url, concurrency=4, clock=clock)
        second = assert_exactly_once(db, campaign_id, first_sink, sink)
        assert sink.count == 40 - sent_before
    assert resumed.status == "finished" and set(second.values()) == {"sent"}


def test_pausing_a_draft_is_refused(sqlite_db: Engine) -> None:
    campaign_id = make_campaign(sqlite_db, addresses(2))
    with pytest.raises(CampaignError, match="only a sending campaign"):
        pause_campaign(sqlite_db, campaign_id)


def test_deferral_backoff_with_an_injected_clock(sqlite_db: Engine) -> None:
    db = sqlite_db
    emails = addresses(3)
    slow = emails[1]
    campaign_id = make_campaign(db, emails)
    clock = FakeClock(utcnow())
    start = clock.now()
    plan = FaultPlan(rcpt_replies={slow: "451 4.3.0 try again later"}, rcpt_reply_times={slow: 2})
    with Sink(faults=plan) as sink:

        def send() -> SendResult:
            return send_campaign(db, campaign_id, sink.url, concurrency=1, clock=clock)

        first = send()
        assert first.outcomes["defer"] == 1 and first.status == "sending"
        assert _row(db, slow) == ("deferred", 1, start + timedelta(minutes=5))

        clock.advance(timedelta(minutes=4, seconds=59))
        assert send().attempted == 0  # not due yet

        clock.advance(timedelta(seconds=1))
        retry = clock.now()
        assert send().outcomes["defer"] == 1
        assert _row(db, slow) == ("deferred", 2, retry + timedelta(minutes=10))

        clock.advance(timedelta(minutes=10))
        last = send()
        assert last.outcomes["sent"] == 1 and last.status == "finished"
        assert_exactly_once(db, campaign_id, sink)


def test_a_recipient_deferred_past_the_lifetime_fails_soft(sqlite_db: Engine) -> None:
    db = sqlite_db
    emails = addresses(2)
    campaign_id = make_campaign(db, emails)
    clock = FakeClock(utcnow())
    with Sink(rcpt_replies={emails[0]: "452 4.2.2 mailbox full"}) as sink:
        for _ in range(40):
            result = send_campaign(db, campaign_id, sink.url, concurrency=1, clock=clock)
            if result.status == "finished":
                break
            clock.advance(timedelta(hours=4))
        assert sink.count == 1
    with db.connect() as conn:
        row = conn.execute(
            select(messages.c.state, messages.c.attempts, messages.c.smtp_reply).where(
                messages.c.email == emails[0]
            )
        ).one()
    assert result.status == "finished"
    assert row.state == "failed" and row.smtp_reply.startswith("gave up after")
    # 5 min, 10, 20, 40, 80, 160, then every 4 h: about 33 tries over the 5 days.
    assert 25 <= row.attempts <= 36


def _row(db: Engine, email: str) -> tuple[str, int, object]:
    with db.connect() as conn:
        row = conn.execute(
            select(messages.c.state, messages.c.attempts, messages.c.next_attempt_at).where(
                messages.c.email == email
            )
        ).one()
    return row.state, row.attempts, row.next_attempt_at


def test_finished_only_when_nothing_is_pending(sqlite_db: Engine) -> None:
    db = sqlite_db
    emails = addresses(5)
    campaign_id = make_campaign(db, emails)
    with Sink(rcpt_replies={emails[2]: "450 4.2.0 busy"}) as sink:
        result = send_campaign(db, campaign_id, sink.url)
    assert result.ledger["deferred"] == 1
    with db.connect() as conn:
        status = conn.execute(
            select(campaigns.c.status).where(campaigns.c.id == campaign_id)
        ).scalar_one()
    assert status == "sending"
    assert ledger(db, campaign_id)[emails[2]] == "deferred"
