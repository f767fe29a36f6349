"""Helpers shared by the dispatch tests (no tests here): workspaces, a fake clock, checks."""

from __future__ import annotations

import asyncio
import collections
from datetime import UTC, datetime, timedelta

import pandas as pd
from sqlalchemy import Engine, select

from mailkit.campaigns import create_campaign
from mailkit.contacts import import_contacts
from mailkit.sink import Sink
from mailkit.storage.schema import messages
from mailkit.templates import save_template

HTML = "<p>{{ name }} 様</p><p>{{ prefecture }}の会員様へ、春のご案内です。</p>"
START = datetime(2026, 4, 1, 1, 0, tzinfo=UTC)  # 10:00 in Tokyo


class FakeClock:
    """A clock whose ``sleep`` moves time forward instantly (no real waiting)."""

    def __init__(self, now: datetime = START) -> None:
        self.current = now
        self.slept = 0.0

    def now(self) -> datetime:
        return self.current

    async def sleep(self, seconds: float) -> None:
        self.slept += seconds
        self.current += timedelta(seconds=seconds)
        await asyncio.sleep(0)  # still let the other tasks run, as a real sleep would

    def advance(self, delta: timedelta) -> None:
        self.current += delta


def addresses(n: int, domain: str = "example.jp", prefix: str = "user") -> list[str]:
    return [f"{prefix}{i:05d}@{domain}" for i in range(n)]


def make_campaign(
    db: Engine,
    emails: list[str],
    *,
    html: str = HTML,
    subject: str = "{{ name }}様へ 春のご案内",
    name: str = "春",
    from_addr: str = "ショップ <news@shop.example.jp>",
) -> int:
    """Import ``emails`` as contacts (with Japanese names), a template, and a draft campaign
    whose segment is all of them; return the campaign id."""
    frame = pd.DataFrame(
        {
            "email": emails,
            "name": [f"山田{i}" for i in range(len(emails))],
            "prefecture": ["東京都"] * len(emails),
        }
    )
    report = import_contacts(db, frame, list_name=f"list-{name}")
    assert not report.rejected, report.rejected
    save_template(db, f"tpl-{name}", subject=subject, html=html)
    campaign = create_campaign(
        db,
        name,
        template=f"tpl-{name}",
        segment=f"list == 'list-{name}'",
        from_addr=from_addr,
    )
    return campaign.id


def ledger(db: Engine, campaign_id: int) -> dict[str, str]:
    """email → state."""
    with db.connect() as conn:
        rows = conn.execute(
            select(messages.c.email, messages.c.state).where(messages.c.campaign_id == campaign_id)
        ).all()
    return {r.email: r.state for r in rows}


def received_counts(*sinks: Sink) -> collections.Counter[str]:
    """How many times the sinks accepted a message for each recipient."""
    counts: collections.Counter[str] = collections.Counter()
    for sink in sinks:
        for envelope in sink.envelopes():
            for rcpt in envelope.rcpt_tos:
                counts[rcpt.lower()] += 1
    return counts


def assert_exactly_once(db: Engine, campaign_id: int, *sinks: Sink) -> dict[str, str]:
    """No recipient twice (over all ``sinks``); every ``sent`` row received exactly once;
    nothing else received except ``unknown`` and ``sending`` rows (which may or may not have
    arrived).
    Returns the ledger."""
    states = ledger(db, campaign_id)
    counts = received_counts(*sinks)
    twice = {email: n for email, n in counts.items() if n > 1}
    assert not twice, f"received more than once: {twice}"
    for email, state in states.items():
        if state == "sent":
            assert counts[email] == 1, f"{email} is sent but arrived {counts[email]} times"
        elif state not in ("unknown", "sending"):  # in flight: may have arrived or not
            assert counts[email] == 0, f"{email} is {state} but arrived"
    assert set(counts) <= set(states)
    return states
