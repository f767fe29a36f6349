"""Per-domain pacing and shared slow-downs, driven by an injected clock."""

from __future__ import annotations

from datetime import timedelta

import pytest
from sqlalchemy import Engine, select
from test_dispatch_support import START, FakeClock, addresses, assert_exactly_once, make_campaign

from mailkit.dispatch import DEFAULT_PACING, DomainPacer, PacingRule, send_campaign
from mailkit.dispatch.pacing import Slowdown, load_slowdowns, retry_delay, save_slowdown
from mailkit.errors import ConfigError
from mailkit.sink import Sink
from mailkit.storage.schema import domain_pacing, utcnow


@pytest.fixture(autouse=True)
def _no_dkim_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("MAILKIT_DKIM_DOMAIN", "MAILKIT_DKIM_SELECTOR", "MAILKIT_DKIM_KEY"):
        monkeypatch.delenv(name, raising=False)


def test_defaults_cover_the_japanese_carriers_and_big_webmail() -> None:
    for domain in ("docomo.ne.jp", "ezweb.ne.jp", "au.com", "softbank.ne.jp", "i.softbank.jp"):
        assert DEFAULT_PACING[domain].max_connections <= 2
        assert DEFAULT_PACING[domain].per_minute is not None
    for domain in ("gmail.com", "outlook.com", "hotmail.com"):
        assert DEFAULT_PACING[domain].per_minute is not None


def test_retry_delay_doubles_from_five_minutes_up_to_four_hours() -> None:
    assert [retry_delay(n) for n in (1, 2, 3, 4)] == [timedelta(minutes=m) for m in (5, 10, 20, 40)]
    assert retry_delay(7) == timedelta(hours=4) and retry_delay(500) == timedelta(hours=4)


def test_rate_limit_allows_a_burst_then_one_per_interval() -> None:
    pacer = DomainPacer(rules={"slow.jp": PacingRule(max_connections=2, per_minute=60)})
    now = START
    for _ in range(2):  # the burst: as many as connections
        assert pacer.wait("slow.jp", now) == 0
        pacer.take("slow.jp", now)
        pacer.release("slow.jp")
    assert pacer.wait("slow.jp", now) == pytest.approx(1.0)
    assert pacer.wait("slow.jp", now + timedelta(seconds=1)) == 0
    pacer.take("slow.jp", now + timedelta(seconds=1))
    pacer.release("slow.jp")
    assert pacer.wait("slow.jp", now + timedelta(seconds=1)) == pytest.approx(1.0)
    # Another domain is not held up by this one.
    assert pacer.wait("other.jp", now) == 0


def test_connection_cap_per_domain() -> None:
    pacer = DomainPacer(rules={"cap.jp": PacingRule(max_connections=2)})
    pacer.take("cap.jp", START)
    pacer.take("cap.jp", START)
    assert pacer.wait("cap.jp", START) > 0
    pacer.release("cap.jp")
    assert pacer.wait("cap.jp", START) == 0


def test_pacing_rule_validation() -> None:
    with pytest.raises(ConfigError):
        PacingRule(max_connections=0)
    with pytest.raises(ConfigError):
        PacingRule(max_connections=1, per_minute=0)


def test_a_slowed_down_domain_waits_and_then_goes_at_half_rate() -> None:
    pacer = DomainPacer(rules={"d.jp": PacingRule(max_connections=1, per_minute=60)})
    pacer.update_slowdowns({"d.jp": Slowdown(1, START + timedelta(minutes=1), START)})
    assert pacer.wait("d.jp", START) == pytest.approx(60)
    later = START + timedelta(minutes=1)
    assert pacer.wait("d.jp", later) == 0
    assert pacer.interval("d.jp", later) == pytest.approx(2.0)  # 60/min halved
    # After an hour without push-back the penalty is forgotten.
    assert pacer.interval("d.jp", START + timedelta(hours=2)) == pytest.approx(1.0)


def test_slowdowns_escalate_once_per_episode_and_are_shared(sqlite_db: Engine) -> None:
    db = sqlite_db
    now = START
    with db.begin() as conn:
        first = save_slowdown(conn, "docomo.ne.jp", "421 4.7.0 too many", now)
        # A second worker's 421 from the same burst does not escalate again.
        same = save_slowdown(conn, "docomo.ne.jp", "421 4.7.0 too many", now)
    assert first == same == now + timedelta(minutes=1)
    later = now + timedelta(minutes=2)
    with db.begin() as conn:
        second = save_slowdown(conn, "docomo.ne.jp", "421 4.7.0 again", later)
    assert second == later + timedelta(minutes=2)
    shared = load_slowdowns(db)["docomo.ne.jp"]
    assert shared.penalty == 2 and shared.slow_until == second


def test_a_4_7_deferral_slows_that_domain_for_every_worker(sqlite_db: Engine) -> None:
    db = sqlite_db
    carrier = addresses(3, "docomo.ne.jp", "keitai")
    emails = carrier + addresses(5)
    campaign_id = make_campaign(db, emails)
    clock = FakeClock(utcnow())
    with Sink(rcpt_replies={carrier[0]: "450 4.7.1 too many messages, slow down"}) as sink:
        result = send_campaign(db, campaign_id, sink.url, clock=clock, max_wait=30)
        states = assert_exactly_once(db, campaign_id, sink)
    assert states[carrier[0]] == "deferred"
    with db.connect() as conn:
        penalty = conn.execute(
            select(domain_pacing.c.penalty).where(domain_pacing.c.domain == "docomo.ne.jp")
        ).scalar_one()
    assert penalty == 1
    # The other docomo recipients waited (a minute is over max_wait): left for a later run,
    # while every other domain was sent.
    assert all(states[e] in ("queued", "sent") for e in carrier[1:])
    assert [states[e] for e in emails[3:]] == ["sent"] * 5
    if any(states[e] == "queued" for e in carrier[1:]):
        assert result.note is not None and "docomo.ne.jp" in result.note


def test_paced_domains_are_waited_for_with_the_injected_clock(sqlite_db: Engine) -> None:
    db = sqlite_db
    emails = addresses(6, "slow.example.jp")
    campaign_id = make_campaign(db, emails)
    clock = FakeClock(utcnow())
    rules = {"slow.example.jp": PacingRule(max_connections=1, per_minute=6)}  # one per 10 s
    with Sink() as sink:
        result = send_campaign(db, campaign_id, sink.url, clock=clock, pacing=rules, concurrency=3)
        assert_exactly_once(db, campaign_id, sink)
    assert result.status == "finished"
    assert clock.slept >= 50  # five gaps of ten seconds, waited on the fake clock
