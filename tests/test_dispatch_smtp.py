"""What each SMTP reply and failure does to the ledger, with faults injected by the sink."""

from __future__ import annotations

from datetime import timedelta

import pytest
from sqlalchemy import Engine, select
from test_dispatch_support import FakeClock, addresses, assert_exactly_once, ledger, make_campaign

from mailkit.dispatch import SafetyStop, send_campaign
from mailkit.dispatch.pacing import relay_key
from mailkit.sink import FaultPlan, Sink
from mailkit.storage.schema import domain_pacing, events, messages, suppressions, utcnow


@pytest.fixture(autouse=True)
def _no_dkim_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("MAILKIT_DKIM_DOMAIN", "MAILKIT_DKIM_SELECTOR", "MAILKIT_DKIM_KEY"):
        monkeypatch.delenv(name, raising=False)


def _suppressed(db: Engine) -> list[tuple[str, str]]:
    with db.connect() as conn:
        return [tuple(r) for r in conn.execute(select(suppressions.c.email, suppressions.c.reason))]


def test_421_greeting_defers_the_relay_and_fails_nobody(sqlite_db: Engine) -> None:
    db = sqlite_db
    campaign_id = make_campaign(db, addresses(20))
    clock = FakeClock(utcnow())
    with Sink(faults=FaultPlan(greeting_reply="421 4.3.2 too busy, try later")) as sink:
        result = send_campaign(db, campaign_id, sink.url, clock=clock)
        assert sink.count == 0
        assert result.status == "sending"
        assert result.note is not None and "busy" in result.note
        assert set(ledger(db, campaign_id).values()) == {"queued"}
        with db.connect() as conn:
            (penalty, until) = conn.execute(
                select(domain_pacing.c.penalty, domain_pacing.c.slow_until).where(
                    domain_pacing.c.domain == relay_key("127.0.0.1", sink.port)
                )
            ).one()
        assert penalty == 1 and until == clock.now() + timedelta(minutes=1)

        # Right away, another run leaves the relay alone instead of hammering it.
        connections = sink.connections
        again = send_campaign(db, campaign_id, sink.url, clock=clock, max_wait=5)
        assert again.attempted == 0 and sink.connections == connections
        assert again.note is not None and "slowed down" in again.note

    with Sink() as healthy:
        done = send_campaign(db, campaign_id, healthy.url, clock=clock)
        assert_exactly_once(db, campaign_id, healthy)
    assert done.status == "finished" and healthy.count == 20


def test_421_on_the_first_connection_only_is_waited_out(sqlite_db: Engine) -> None:
    db = sqlite_db
    campaign_id = make_campaign(db, addresses(10))
    clock = FakeClock(utcnow())
    with Sink(faults=FaultPlan(greeting_replies=("421 4.7.0 slow down",))) as sink:
        first = send_campaign(db, campaign_id, sink.url, clock=clock, concurrency=1)
        assert first.attempted == 0
        # The relay's slow-down is one minute: a run allowed to wait that long goes on.
        second = send_campaign(db, campaign_id, sink.url, clock=clock, concurrency=2)
        assert clock.slept >= 60
        assert second.status == "finished"
        assert_exactly_once(db, campaign_id, sink)
        assert sink.count == 10


def test_421_after_n_messages_reconnects_and_loses_nobody(sqlite_db: Engine) -> None:
    db = sqlite_db
    campaign_id = make_campaign(db, addresses(25))
    with Sink(faults=FaultPlan(messages_per_connection=3)) as sink:
        result = send_campaign(db, campaign_id, sink.url, concurrency=2)
        assert_exactly_once(db, campaign_id, sink)
        assert sink.count == 25 and sink.connections >= 25 // 3
    assert result.status == "finished" and result.outcomes["sent"] == 25


@pytest.mark.parametrize(
    "reply", ["450 4.2.1 mailbox busy", "451 4.3.0 local error", "452 4.2.2 over quota"]
)
def test_4xx_defers_with_backoff(sqlite_db: Engine, reply: str) -> None:
    db = sqlite_db
    emails = addresses(4)
    campaign_id = make_campaign(db, emails)
    clock = FakeClock(utcnow())
    with Sink(rcpt_replies={emails[1]: reply}) as sink:
        result = send_campaign(db, campaign_id, sink.url, clock=clock)
    assert result.outcomes["defer"] == 1 and result.status == "sending"
    with db.connect() as conn:
        row = conn.execute(
            select(messages.c.state, messages.c.next_attempt_at, messages.c.smtp_code).where(
                messages.c.email == emails[1]
            )
        ).one()
    assert row.state == "deferred" and row.smtp_code == int(reply[:3])
    assert row.next_attempt_at == clock.now() + timedelta(minutes=5)
    assert _suppressed(db) == []


def test_550_5_1_1_bounces_and_suppresses(sqlite_db: Engine) -> None:
    db = sqlite_db
    emails = addresses(5)
    campaign_id = make_campaign(db, emails)
    with Sink(rcpt_replies={emails[3]: "550 5.1.1 <x>: user unknown"}) as sink:
        result = send_campaign(db, campaign_id, sink.url)
        assert_exactly_once(db, campaign_id, sink)
    assert result.status == "finished"
    assert ledger(db, campaign_id)[emails[3]] == "failed"
    assert _suppressed(db) == [(emails[3], "hard_bounce")]
    with db.connect() as conn:
        detail = conn.execute(select(events.c.detail).where(events.c.type == "bounce")).scalar_one()
    assert detail["kind"] == "hard" and detail["code"] == 550


def test_550_5_7_26_pauses_the_campaign_and_suppresses_nobody(sqlite_db: Engine) -> None:
    db = sqlite_db
    emails = addresses(30)
    campaign_id = make_campaign(db, emails)
    dmarc = "550 5.7.26 unauthenticated email from shop.example.jp is not accepted due to DMARC"
    with Sink(rcpt_replies={emails[10]: dmarc}) as sink:
        result = send_campaign(db, campaign_id, sink.url, concurrency=1)
        states = assert_exactly_once(db, campaign_id, sink)
    assert result.status == "paused"
    assert result.status_reason is not None and "5.7.26" in result.status_reason
    assert "DKIM" in result.status_reason
    assert _suppressed(db) == []
    assert states[emails[10]] == "queued"  # not an attempt: it goes again after the fix
    assert "failed" not in states.values() and "sending" not in states.values()
    assert list(states.values()).count("sent") == 10


def test_554_fails_only_that_recipient(sqlite_db: Engine) -> None:
    db = sqlite_db
    emails = addresses(6)
    campaign_id = make_campaign(db, emails)
    with Sink(faults=FaultPlan(data_replies={emails[2]: "554 5.6.0 message rejected"})) as sink:
        result = send_campaign(db, campaign_id, sink.url)
        states = assert_exactly_once(db, campaign_id, sink)
    assert result.status == "finished"
    assert states[emails[2]] == "failed" and list(states.values()).count("sent") == 5
    assert _suppressed(db) == []


def test_connection_dropped_mid_data_is_retried_never_lost(sqlite_db: Engine) -> None:
    db = sqlite_db
    emails = addresses(6)
    cut = emails[2]
    campaign_id = make_campaign(db, emails)
    clock = FakeClock(utcnow())
    with Sink(faults=FaultPlan(drop_mid_data={cut})) as sink:
        send_campaign(db, campaign_id, sink.url, clock=clock)
        states = assert_exactly_once(db, campaign_id, sink)
    # The client cannot always tell a cut in the data from a lost final reply: either way
    # the recipient is never marked sent or failed, and nothing arrived.
    assert states[cut] in ("deferred", "unknown")
    assert list(states.values()).count("sent") == 5


def test_no_reply_after_the_data_is_unknown_and_not_resent(sqlite_db: Engine) -> None:
    db = sqlite_db
    emails = addresses(4)
    silent = emails[1]
    campaign_id = make_campaign(db, emails)
    with Sink(faults=FaultPlan(stall_at_data_end={silent})) as sink:
        url = sink.url + "?data_timeout=0.3"
        result = send_campaign(db, campaign_id, url)
        states = assert_exactly_once(db, campaign_id, sink)
        assert states[silent] == "unknown" and result.outcomes["unknown"] == 1
        assert result.status == "finished"  # decided: reported, never re-sent by itself
        assert send_campaign(db, campaign_id, url).attempted == 0
    with Sink() as again:
        resent = send_campaign(db, campaign_id, again.url, resend_unknown=True)
        assert [e.rcpt_tos for e in again.envelopes()] == [(silent,)]
    assert resent.status == "finished"


def test_a_stall_before_the_data_times_out_into_a_deferral(sqlite_db: Engine) -> None:
    db = sqlite_db
    emails = addresses(3)
    campaign_id = make_campaign(db, emails)
    with Sink(faults=FaultPlan(stall_at_rcpt={emails[0]})) as sink:
        send_campaign(db, campaign_id, sink.url + "?timeout=0.3")
        states = assert_exactly_once(db, campaign_id, sink)
    assert states[emails[0]] == "deferred"
    assert list(states.values()).count("sent") == 2


def test_safety_stop_pauses_a_list_that_bounces_too_much(sqlite_db: Engine) -> None:
    db = sqlite_db
    emails = addresses(60)
    campaign_id = make_campaign(db, emails)
    unknown_user = {e: "550 5.1.1 user unknown" for e in emails[:12]}
    safety = SafetyStop(threshold=0.1, first=50, min_sample=20)
    with Sink(rcpt_replies=unknown_user) as sink:
        result = send_campaign(db, campaign_id, sink.url, concurrency=1, safety=safety)
        states = assert_exactly_once(db, campaign_id, sink)
    assert result.status == "paused"
    assert result.status_reason is not None and "hard-bounced" in result.status_reason
    assert "queued" in states.values()  # it stopped early
    # More than 10% of the first 50 is certain after the 6th bounce.
    assert 6 <= len(_suppressed(db)) < 12


def test_safety_stop_leaves_a_clean_list_alone(sqlite_db: Engine) -> None:
    db = sqlite_db
    emails = addresses(40)
    campaign_id = make_campaign(db, emails)
    with Sink(rcpt_replies={emails[5]: "550 5.1.1 user unknown"}) as sink:
        result = send_campaign(
            db, campaign_id, sink.url, safety=SafetyStop(threshold=0.05, first=40, min_sample=10)
        )
    assert result.status == "finished"
