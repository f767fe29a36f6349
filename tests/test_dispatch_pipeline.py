"""The per-message pipeline in real sends: DKIM, the tracking seam, A/B variants, dry run, test."""

from __future__ import annotations

import email
import re
from collections.abc import Callable
from email import policy
from pathlib import Path

import dkim
import pytest
from sqlalchemy import Engine, func, insert, select, update
from test_dispatch_support import addresses, assert_exactly_once, make_campaign

from mailkit.campaigns import load_campaign, snapshot_campaign
from mailkit.dispatch import (
    Tracker,
    load_dkim_signer,
    save_dry_run,
    send_campaign,
    send_campaign_test,
)
from mailkit.dispatch.trial import DryRun
from mailkit.dkim import DKIMSigner, DNSRecord, build_dkim_keypair, save_dkim_key
from mailkit.errors import ConfigError, PreflightError
from mailkit.sink import Sink
from mailkit.storage.schema import campaign_variants, messages
from mailkit.templates import load_template, save_template

DOMAIN = "shop.example.jp"


def dns_for(records: tuple[DNSRecord, ...]) -> Callable[..., bytes | None]:
    answers = {f"{r.name}.".encode(): "".join(r.strings).encode() for r in records}

    def dnsfunc(name: bytes, timeout: int = 5) -> bytes | None:
        return answers.get(name)

    return dnsfunc


@pytest.fixture(scope="module")
def key_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("dkim")
    rsa_path = save_dkim_key(build_dkim_keypair(), folder / "rsa.pem")
    ed_path = save_dkim_key(build_dkim_keypair(algorithm="ed25519"), folder / "ed.pem")
    return rsa_path, ed_path


@pytest.fixture
def dkim_env(monkeypatch: pytest.MonkeyPatch, key_files: tuple[Path, Path]) -> DKIMSigner:
    rsa_path, ed_path = key_files
    monkeypatch.setenv("MAILKIT_DKIM_DOMAIN", DOMAIN)
    monkeypatch.setenv("MAILKIT_DKIM_SELECTOR", "mk2026")
    monkeypatch.setenv("MAILKIT_DKIM_KEY", str(rsa_path))
    monkeypatch.setenv("MAILKIT_DKIM_ED25519_SELECTOR", "mk2026e")
    monkeypatch.setenv("MAILKIT_DKIM_ED25519_KEY", str(ed_path))
    signer = load_dkim_signer()
    assert signer is not None
    return signer


@pytest.fixture
def no_dkim_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in (
        "MAILKIT_DKIM_DOMAIN",
        "MAILKIT_DKIM_SELECTOR",
        "MAILKIT_DKIM_KEY",
        "MAILKIT_DKIM_ED25519_SELECTOR",
        "MAILKIT_DKIM_ED25519_KEY",
    ):
        monkeypatch.delenv(name, raising=False)


class LinkTracker:
    """A tracking layer for the test: predictable URLs that name the ledger row."""

    def unsubscribe_url(self, message_row_id: int) -> str:
        return f"https://t.example.jp/u/{message_row_id}"

    def rewrite_html(self, html: str, message_row_id: int) -> str:
        pixel = f'<img src="https://t.example.jp/o/{message_row_id}.gif" alt="">'
        return (
            html.replace(
                'href="https://shop.example.jp/', f'href="https://t.example.jp/c/{message_row_id}/'
            )
            + pixel
        )

    def list_unsubscribe_headers(self, message_row_id: int) -> dict[str, str]:
        return {
            "List-Unsubscribe": f"<https://t.example.jp/u/{message_row_id}>",
            "List-Unsubscribe-Post": "List-Unsubscribe=One-Click",
        }

    def return_path(self, message_row_id: int) -> str:
        return f"bounces+{message_row_id}@{DOMAIN}"


TRACKED_HTML = (
    '<p>{{ name }} 様</p><p><a href="https://shop.example.jp/sale">セール会場へ</a></p>'
    '<p><a href="{{ unsubscribe_url }}">配信停止</a></p>'
)


def _row_ids(db: Engine, campaign_id: int) -> dict[str, int]:
    with db.connect() as conn:
        return {
            r.email: r.id
            for r in conn.execute(
                select(messages.c.email, messages.c.id).where(messages.c.campaign_id == campaign_id)
            )
        }


def test_every_message_of_a_campaign_verifies_with_dkimpy(
    sqlite_db: Engine, dkim_env: DKIMSigner
) -> None:
    db = sqlite_db
    assert isinstance(LinkTracker(), Tracker)
    campaign_id = make_campaign(db, addresses(25), html=TRACKED_HTML)
    dnsfunc = dns_for(dkim_env.render_dns_records())
    with Sink() as sink:
        result = send_campaign(db, campaign_id, sink.url, tracker=LinkTracker())
        received = sink.envelopes()
    assert result.status == "finished" and len(received) == 25
    for envelope in received:
        signed = envelope.data
        for idx, algorithm in enumerate((b"rsa-sha256", b"ed25519-sha256")):
            verifier = dkim.DKIM(signed)
            assert verifier.verify(idx=idx, dnsfunc=dnsfunc), envelope.rcpt_tos
            headers = [v for k, v in dkim.rfc822_parse(signed)[0] if k.lower() == b"dkim-signature"]
            tags = dict(dkim.util.parse_tag_value(headers[idx]))
            assert tags[b"a"] == algorithm and tags[b"c"] == b"relaxed/relaxed"
            signed_headers = [
                h.strip() for h in re.sub(rb"\s+", b"", tags[b"h"]).lower().split(b":")
            ]
            assert b"list-unsubscribe" in signed_headers
            assert b"list-unsubscribe-post" in signed_headers
            assert signed_headers.count(b"from") == 2  # oversigned


def test_tracker_seam_shapes_every_message(sqlite_db: Engine, no_dkim_env: None) -> None:
    db = sqlite_db
    campaign_id = make_campaign(db, addresses(6), html=TRACKED_HTML)
    with Sink() as sink:
        send_campaign(db, campaign_id, sink.url, tracker=LinkTracker())
        assert_exactly_once(db, campaign_id, sink)
        envelopes = sink.envelopes()
    ids = _row_ids(db, campaign_id)
    for envelope in envelopes:
        (rcpt,) = envelope.rcpt_tos
        row_id = ids[rcpt]
        assert envelope.mail_from == f"bounces+{row_id}@{DOMAIN}"
        msg = email.message_from_bytes(envelope.data, policy=policy.default)
        assert msg["List-Unsubscribe"] == f"<https://t.example.jp/u/{row_id}>"
        assert msg["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
        html = msg.get_body(("html",)).get_content()
        assert f"https://t.example.jp/c/{row_id}/sale" in html
        assert f'href="https://t.example.jp/u/{row_id}"' in html
        assert f"https://t.example.jp/o/{row_id}.gif" in html
        assert msg["From"].addresses[0].addr_spec == f"news@{DOMAIN}"


def test_each_row_is_rendered_with_its_variant(sqlite_db: Engine, no_dkim_env: None) -> None:
    db = sqlite_db
    emails = addresses(9)
    campaign_id = make_campaign(db, emails)
    other = save_template(db, "variant-b", subject="B案 {{ name }}様", html="<p>B: {{ name }}</p>")
    campaign = load_campaign(db, campaign_id)
    base = load_template(db, campaign.template_id)
    with db.begin() as conn:
        conn.execute(
            insert(campaign_variants),
            [
                {
                    "campaign_id": campaign_id,
                    "name": "A",
                    "template_id": base.id,
                    "template_version": base.version,
                    "subject": "A案 {{ name }}様",
                },
                {
                    "campaign_id": campaign_id,
                    "name": "B",
                    "template_id": other.id,
                    "template_version": other.version,
                    "subject": None,
                },
            ],
        )
    snapshot_campaign(db, campaign_id)
    assigned = {e: ("A", "B", None)[i % 3] for i, e in enumerate(emails)}
    with db.begin() as conn:
        for address, variant in assigned.items():
            conn.execute(
                update(messages)
                .where(messages.c.campaign_id == campaign_id, messages.c.email == address)
                .values(variant=variant)
            )
    with Sink() as sink:
        send_campaign(db, campaign_id, sink.url)
        received = {
            e.rcpt_tos[0]: email.message_from_bytes(e.data, policy=policy.default)
            for e in sink.envelopes()
        }
    assert len(received) == 9
    for address, variant in assigned.items():
        msg = received[address]
        html = msg.get_body(("html",)).get_content()
        if variant == "A":
            assert msg["Subject"].startswith("A案 ") and "春のご案内" in html
        elif variant == "B":
            assert msg["Subject"].startswith("B案 ") and "<p>B: " in html
        else:
            assert msg["Subject"].endswith("様へ 春のご案内")


def test_preflight_covers_every_variant(sqlite_db: Engine, no_dkim_env: None) -> None:
    db = sqlite_db
    campaign_id = make_campaign(db, addresses(3))
    broken = save_template(db, "needs-coupon", subject="{{ coupon }}", html="<p>{{ coupon }}</p>")
    with db.begin() as conn:
        conn.execute(
            insert(campaign_variants).values(
                campaign_id=campaign_id,
                name="B",
                template_id=broken.id,
                template_version=broken.version,
            )
        )
    with Sink() as sink, pytest.raises(PreflightError, match="variant 'B'"):
        send_campaign(db, campaign_id, sink.url)
    assert sink.count == 0
    with db.connect() as conn:
        assert conn.execute(select(func.count()).select_from(messages)).scalar_one() == 0


def test_dry_run_writes_signed_messages_and_touches_nothing(
    sqlite_db: Engine, dkim_env: DKIMSigner, tmp_path: Path
) -> None:
    db = sqlite_db
    emails = addresses(5)
    campaign_id = make_campaign(db, emails)
    dry = save_dry_run(db, campaign_id, tmp_path / "out")
    assert len(dry.files) == 5 and not dry.failures
    dnsfunc = dns_for(dkim_env.render_dns_records())
    seen = set()
    for path in dry.files:
        data = path.read_bytes()
        assert dkim.DKIM(data).verify(idx=0, dnsfunc=dnsfunc)
        msg = email.message_from_bytes(data, policy=policy.default)
        seen.add(msg["To"].addresses[0].addr_spec)
    assert seen == set(emails)
    assert load_campaign(db, campaign_id).status == "draft"
    with db.connect() as conn:
        assert conn.execute(select(func.count()).select_from(messages)).scalar_one() == 0

    # --limit N: the first N recipients only, before and after the campaign started.
    def recipients(dry: DryRun) -> list[str]:
        return [
            email.message_from_bytes(p.read_bytes(), policy=policy.default)["To"]
            .addresses[0]
            .addr_spec
            for p in dry.files
        ]

    assert recipients(save_dry_run(db, campaign_id, tmp_path / "two", limit=2)) == emails[:2]
    snapshot_campaign(db, campaign_id)
    started = save_dry_run(db, campaign_id, tmp_path / "started", limit=3)
    assert recipients(started) == emails[:3]
    with pytest.raises(ValueError, match="limit must be a non-negative int"):
        save_dry_run(db, campaign_id, tmp_path / "bad", limit=-1)


def test_test_send_goes_to_one_address_and_not_into_the_ledger(
    sqlite_db: Engine, no_dkim_env: None
) -> None:
    db = sqlite_db
    emails = addresses(4)
    campaign_id = make_campaign(db, emails)
    with Sink() as sink:
        outcome = send_campaign_test(db, campaign_id, "tester@shop.example.jp", sink.url)
        (envelope,) = sink.envelopes()
    assert outcome.kind == "sent"
    assert envelope.rcpt_tos == ("tester@shop.example.jp",)
    msg = email.message_from_bytes(envelope.data, policy=policy.default)
    assert msg["Subject"].startswith("[TEST] ") and "山田0" in msg["Subject"]
    assert msg["To"].addresses[0].addr_spec == "tester@shop.example.jp"
    assert load_campaign(db, campaign_id).status == "draft"
    with db.connect() as conn:
        assert conn.execute(select(func.count()).select_from(messages)).scalar_one() == 0


def test_dkim_settings_must_come_together(
    monkeypatch: pytest.MonkeyPatch, no_dkim_env: None
) -> None:
    assert load_dkim_signer() is None
    monkeypatch.setenv("MAILKIT_DKIM_DOMAIN", DOMAIN)
    with pytest.raises(ConfigError, match="MAILKIT_DKIM_KEY"):
        load_dkim_signer()


def test_message_ids_are_recorded_per_attempt(sqlite_db: Engine, no_dkim_env: None) -> None:
    db = sqlite_db
    campaign_id = make_campaign(db, addresses(3))
    with Sink() as sink:
        send_campaign(db, campaign_id, sink.url)
        sent_ids = {
            email.message_from_bytes(e.data, policy=policy.default)["Message-ID"]
            for e in sink.envelopes()
        }
    with db.connect() as conn:
        ledger_ids = set(
            conn.execute(
                select(messages.c.message_id).where(messages.c.campaign_id == campaign_id)
            ).scalars()
        )
    assert sent_ids == ledger_ids and len(ledger_ids) == 3
    assert all(re.fullmatch(r"<\d+\.[0-9a-f]{24}@shop\.example\.jp>", i) for i in ledger_ids)
