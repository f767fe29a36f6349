"""Bounces through the whole policy, on both backends, for messages really sent to a Sink."""

from __future__ import annotations

import mailbox
from pathlib import Path
from typing import Any

import pytest
from bounce_support import RECIPIENTS, Sent, add_contacts, render_fixture, send_spring
from sqlalchemy import Engine, func, select

from mailkit.analytics import build_report
from mailkit.bounces import (
    BouncePolicy,
    IngestReport,
    count_bounce_rejects,
    ingest_bounces,
    load_bounce_rejects,
)
from mailkit.storage.schema import events, inbound_bounces, suppressions
from mailkit.tracking.tokens import Keyring, build_keyring

KEYRING = Keyring({"k1": bytes(range(32))}, "k1")


@pytest.fixture
def sent(db: Engine) -> dict[str, Sent]:
    add_contacts(db)
    return send_spring(db)


def write(folder: Path, name: str, raw: bytes) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_bytes(raw)
    return path


def event_rows(db: Engine, *types: str) -> list[Any]:
    e = events.c
    query = select(e.type, e.message_id, e.campaign_id, e.contact_id, e.detail, e.occurred_at)
    if types:
        query = query.where(e.type.in_(types))
    with db.connect() as conn:
        return list(conn.execute(query.order_by(e.id)))


def suppression_of(db: Engine, email: str) -> Any:
    with db.connect() as conn:
        return conn.execute(select(suppressions).where(suppressions.c.email == email)).first()


# fixture, recipient index, event type, suppression reason, report field
CASES = [
    ("postfix_hard.eml", 0, "bounce", "hard_bounce", "hard"),
    ("exim_hard.eml", 1, "bounce", "hard_bounce", "hard"),
    ("exchange_hard.eml", 2, "bounce", "hard_bounce", "hard"),
    ("gmail_hard.eml", 3, "bounce", "hard_bounce", "hard"),
    ("ezweb_ja.eml", 5, "bounce", "hard_bounce", "hard"),
    ("mangled.eml", 7, "bounce", "hard_bounce", "hard"),
    ("postfix_delayed.eml", 4, "soft_bounce", None, "soft"),
    ("postfix_mailbox_full.eml", 4, "soft_bounce", None, "soft"),
    ("arf_yahoo.eml", 6, "complaint", "complaint", "complaints"),
]


@pytest.mark.parametrize(("name", "who", "event_type", "reason", "field"), CASES)
def test_each_form_through_the_policy(
    db: Engine,
    sent: dict[str, Sent],
    tmp_path: Path,
    name: str,
    who: int,
    event_type: str,
    reason: str | None,
    field: str,
) -> None:
    target = sent[RECIPIENTS[who]]
    path = write(tmp_path, name, render_fixture(name, target, KEYRING))
    report = ingest_bounces(db, path, keyring=KEYRING)

    assert report.seen == 1 and getattr(report, field) == 1
    assert report.suppressed == (1 if reason else 0)
    (event,) = event_rows(db, event_type)
    assert (event.message_id, event.campaign_id) == (target.row_id, target.campaign_id)
    assert event.detail["matched_by"] == "verp"
    assert event.detail["reason"]  # every decision says why
    if event_type != "complaint":
        assert event.detail["kind"] == ("hard" if event_type == "bounce" else "soft")
        assert event.detail["status"][0] == ("5" if event_type == "bounce" else "4")
    row = suppression_of(db, target.email)
    if reason is None:
        assert row is None
        assert event.detail["decision"] == "kept"
    else:
        assert (row.reason, row.campaign_id) == (reason, target.campaign_id)
        assert row.detail and "matched by verp" in row.detail
        (suppressed,) = event_rows(db, "suppressed")
        assert suppressed.detail["reason"] == reason
    # Nobody else was touched.
    with db.connect() as conn:
        assert conn.execute(select(func.count()).select_from(suppressions)).scalar_one() == (
            1 if reason else 0
        )


def test_hard_bounces_count_in_the_deliverability_report(
    db: Engine, sent: dict[str, Sent], tmp_path: Path
) -> None:
    for who, name in [(0, "postfix_hard.eml"), (1, "exim_hard.eml"), (4, "postfix_delayed.eml")]:
        write(tmp_path, name, render_fixture(name, sent[RECIPIENTS[who]], KEYRING))
    report = ingest_bounces(db, tmp_path, keyring=KEYRING)
    assert (report.hard, report.soft, report.suppressed) == (2, 1, 2)
    campaign = build_report(db, sent[RECIPIENTS[0]].campaign_id)
    assert campaign.bounced == 2  # soft bounces are not bounces
    assert campaign.deliverability == round((1 - 2 / len(RECIPIENTS)) * 100, 2)


def test_matching_falls_back_to_message_id_then_to_the_address(
    db: Engine, sent: dict[str, Sent], tmp_path: Path
) -> None:
    first, second = sent[RECIPIENTS[0]], sent[RECIPIENTS[1]]
    # No VERP (a relay rewrote the envelope): the returned Message-ID names the row.
    by_mid = render_fixture("postfix_hard.eml", first, None)
    # Neither VERP nor a known Message-ID: the Final-Recipient and the last message sent to it.
    by_rcpt = render_fixture("gmail_hard.eml", second, None).replace(
        second.message_id.encode(), b"<unknown@elsewhere.example>"
    )
    write(tmp_path, "a.eml", by_mid)
    write(tmp_path, "b.eml", by_rcpt)
    report = ingest_bounces(db, tmp_path, keyring=KEYRING)
    assert (report.hard, report.unmatched) == (2, 0)
    matched = {e.message_id: e.detail["matched_by"] for e in event_rows(db, "bounce")}
    assert matched == {first.row_id: "message_id", second.row_id: "recipient"}
    with db.connect() as conn:
        query = select(inbound_bounces.c.message_id, inbound_bounces.c.matched_by)
        ways = {row.message_id: row.matched_by for row in conn.execute(query)}
    assert ways == matched


def test_an_address_match_survives_a_server_that_changed_its_case(
    db: Engine, sent: dict[str, Sent], tmp_path: Path
) -> None:
    # Neither VERP nor a known Message-ID, and the report names HANAKO.YAMADA@...: the exact
    # address finds no contact, the case-folded one does, then its last message.
    target = sent[RECIPIENTS[0]]
    shouted = Sent(target.row_id, target.campaign_id, target.email.upper(), target.message_id)
    report_bytes = render_fixture("gmail_hard.eml", shouted, None).replace(
        target.message_id.encode(), b"<unknown@elsewhere.example>"
    )
    write(tmp_path, "a.eml", report_bytes)
    report = ingest_bounces(db, tmp_path, keyring=KEYRING)
    assert (report.hard, report.unmatched, report.suppressed) == (1, 0, 1)
    [event] = event_rows(db, "bounce")
    assert (event.message_id, event.detail["matched_by"]) == (target.row_id, "recipient")
    assert suppression_of(db, target.email) is not None


def test_a_forged_verp_token_is_not_trusted(
    db: Engine, sent: dict[str, Sent], tmp_path: Path
) -> None:
    target, victim = sent[RECIPIENTS[0]], sent[RECIPIENTS[1]]
    forged = render_fixture("mangled.eml", victim, build_keyring())  # signed with another key
    write(tmp_path, "forged.eml", forged)
    report = ingest_bounces(db, tmp_path, keyring=KEYRING)
    # The mangled body names nobody, and the token does not verify: nothing to act on.
    assert (report.hard, report.unmatched, report.suppressed) == (0, 1, 0)
    assert suppression_of(db, victim.email) is None and suppression_of(db, target.email) is None
    assert "unmatched" in load_bounce_rejects(db)[0].reason


def test_reports_about_addresses_never_sent_to_change_nothing(db: Engine, tmp_path: Path) -> None:
    add_contacts(db)  # contacts exist, but no campaign was sent
    stranger = Sent(1, 1, RECIPIENTS[0], "<never@sent.example>")
    write(tmp_path, "x.eml", render_fixture("postfix_hard.eml", stranger, None))
    report = ingest_bounces(db, tmp_path, keyring=KEYRING)
    assert (report.seen, report.unmatched, report.suppressed) == (1, 1, 0)
    assert event_rows(db) == []


def test_soft_bounces_suppress_after_three_messages_within_the_window(
    db: Engine, tmp_path: Path
) -> None:
    add_contacts(db, [RECIPIENTS[4]])
    rounds = [send_spring(db, f"round {i}")[RECIPIENTS[4]] for i in range(3)]
    # Two delay notices about the same message count once (an MTA warns every few hours).
    write(tmp_path, "0a.eml", render_fixture("postfix_delayed.eml", rounds[0], KEYRING))
    write(
        tmp_path,
        "0b.eml",
        render_fixture("postfix_delayed.eml", rounds[0], KEYRING).replace(
            b"for more than 4 hour(s)", b"for more than 8 hour(s)"
        ),
    )
    write(tmp_path, "1.eml", render_fixture("postfix_mailbox_full.eml", rounds[1], KEYRING))
    first = ingest_bounces(db, tmp_path, keyring=KEYRING)
    assert (first.soft, first.suppressed) == (3, 0)
    assert suppression_of(db, RECIPIENTS[4]) is None
    counts = [e.detail["soft_count"] for e in event_rows(db, "soft_bounce")]
    assert counts == [1, 1, 2]

    write(tmp_path / "later", "2.eml", render_fixture("postfix_delayed.eml", rounds[2], KEYRING))
    second = ingest_bounces(db, tmp_path / "later", keyring=KEYRING)
    assert (second.soft, second.suppressed) == (1, 1)
    row = suppression_of(db, RECIPIENTS[4])
    assert row.reason == "soft_bounce" and row.campaign_id == rounds[2].campaign_id
    last = event_rows(db, "soft_bounce")[-1]
    assert (
        last.detail["decision"] == "suppressed" and "3 of 3 within 30 days" in last.detail["reason"]
    )


def test_the_soft_limit_and_window_are_configurable(
    db: Engine, sent: dict[str, Sent], tmp_path: Path
) -> None:
    target = sent[RECIPIENTS[4]]
    write(tmp_path, "d.eml", render_fixture("postfix_delayed.eml", target, KEYRING))
    report = ingest_bounces(db, tmp_path, keyring=KEYRING, policy=BouncePolicy(soft_limit=1))
    assert report.suppressed == 1
    assert suppression_of(db, target.email).reason == "soft_bounce"
    with pytest.raises(ValueError):
        BouncePolicy(soft_limit=0)


def test_ingesting_twice_counts_once_across_files_mbox_and_maildir(
    db: Engine, sent: dict[str, Sent], tmp_path: Path
) -> None:
    raws = [
        render_fixture("postfix_hard.eml", sent[RECIPIENTS[0]], KEYRING),
        render_fixture("ezweb_ja.eml", sent[RECIPIENTS[5]], KEYRING),  # CRLF line endings
        render_fixture("arf_yahoo.eml", sent[RECIPIENTS[6]], KEYRING),
        render_fixture("autoreply.eml", sent[RECIPIENTS[1]], KEYRING),
    ]
    box = mailbox.mbox(tmp_path / "bounces.mbox")
    maildir = mailbox.Maildir(tmp_path / "Maildir", create=True)
    for raw in raws:
        box.add(raw)
        maildir.add(raw)
    box.close()

    first = ingest_bounces(db, tmp_path / "bounces.mbox", keyring=KEYRING)
    assert first == IngestReport(seen=4, hard=2, complaints=1, ignored=1, suppressed=3)
    before = event_rows(db)
    again = ingest_bounces(db, [tmp_path / "Maildir", tmp_path / "bounces.mbox"], keyring=KEYRING)
    assert again == IngestReport(seen=8, duplicates=8)
    assert event_rows(db) == before
    assert count_bounce_rejects(db) == 1  # the auto-reply, kept aside once


def test_what_cannot_be_used_is_kept_aside_and_suppresses_nobody(
    db: Engine, sent: dict[str, Sent], tmp_path: Path
) -> None:
    target = sent[RECIPIENTS[1]]
    write(tmp_path, "a_auto.eml", render_fixture("autoreply.eml", target, KEYRING))
    write(tmp_path, "b_garbage.eml", render_fixture("garbage.eml", None, None))
    write(tmp_path, "c_empty.eml", b"")
    write(tmp_path, "d_good.eml", render_fixture("postfix_hard.eml", sent[RECIPIENTS[0]], KEYRING))
    report = ingest_bounces(db, tmp_path, keyring=KEYRING)
    assert report == IngestReport(seen=4, hard=1, ignored=1, rejected=2, suppressed=1)
    assert suppression_of(db, target.email) is None
    rejects = load_bounce_rejects(db)
    assert len(rejects) == 3 and count_bounce_rejects(db) == 3
    reasons = {Path(r.source).name: r.reason for r in rejects}
    assert reasons["a_auto.eml"].startswith("not a bounce: an automatic reply")
    assert reasons["b_garbage.eml"].startswith("unparseable:")
    assert reasons["c_empty.eml"] == "unparseable: empty message"
    assert {r.size for r in rejects if r.source.endswith("c_empty.eml")} == {0}
