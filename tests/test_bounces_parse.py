"""Parsing real-world bounce forms and the hard/soft rules, without a database."""

from __future__ import annotations

import pytest
from bounce_support import FIXTURES, Sent, render_fixture

from mailkit.bounces import (
    build_verp_address,
    classify_status,
    decode_verp,
    parse_bounce,
)
from mailkit.tracking.tokens import Keyring, sign_token

KEYRING = Keyring({"k1": bytes(range(32))}, "k1")
SENT = Sent(
    row_id=4242,
    campaign_id=7,
    email="taro.sato@example.co.jp",
    message_id="<17.abc@shop.example.jp>",
)
VERP = build_verp_address(KEYRING, SENT.row_id, "shop.example.jp")


def parsed(name: str):  # type: ignore[no-untyped-def]
    return parse_bounce(render_fixture(name, SENT, KEYRING))


@pytest.mark.parametrize(
    ("name", "form", "source", "action", "status", "kind"),
    [
        ("postfix_hard.eml", "dsn", "dsn", "failed", "5.1.1", "hard"),
        ("exchange_hard.eml", "dsn", "dsn", "failed", "5.1.10", "hard"),
        ("gmail_hard.eml", "dsn", "dsn", "failed", "5.1.1", "hard"),
        ("postfix_delayed.eml", "dsn", "dsn", "delayed", "4.4.1", "soft"),
        ("postfix_mailbox_full.eml", "dsn", "dsn", "failed", "4.2.2", "soft"),
        ("exim_hard.eml", "nonstandard", "flufl", "failed", "5.1.1", "hard"),
        ("ezweb_ja.eml", "nonstandard", None, "failed", "5.1.1", "hard"),
        ("mangled.eml", "nonstandard", "heuristic", "failed", "5.1.1", "hard"),
    ],
)
def test_bounce_forms_real_servers_write(
    name: str, form: str, source: str | None, action: str, status: str, kind: str
) -> None:
    result = parsed(name)
    assert result.form == form, result.reason
    if source is not None:
        assert result.source == source
    (rcpt,) = result.recipients
    assert (rcpt.action, rcpt.status) == (action, status)
    assert classify_status(rcpt.action, rcpt.status, rcpt.diagnostic) == kind
    assert decode_verp(result.verp_candidates[0], KEYRING) == SENT.row_id
    if name != "mangled.eml":  # the mangled one lost its original's headers
        assert rcpt.final_recipient == SENT.email
        assert SENT.message_id in result.original_message_ids


def test_dsn_fields_are_read_whole() -> None:
    result = parsed("postfix_hard.eml")
    rcpt = result.recipients[0]
    assert result.reporting_mta == "dns; mail.shop.example.jp"
    assert rcpt.original_recipient == SENT.email
    assert rcpt.remote_mta == "dns; mx01.example.jp"
    assert (
        rcpt.diagnostic is not None and "User unknown in virtual mailbox table" in rcpt.diagnostic
    )
    assert result.reported_at is not None and result.reported_at.utcoffset() is not None


def test_japanese_carrier_bounce_in_iso_2022_jp() -> None:
    result = parsed("ezweb_ja.eml")
    assert result.subject == "メール配信エラーのお知らせ"
    assert result.recipients[0].final_recipient == SENT.email


def test_arf_report_is_a_complaint() -> None:
    result = parsed("arf_yahoo.eml")
    assert result.form == "arf"
    assert result.feedback_type == "abuse"
    assert result.user_agent == "Yahoo!-Mail-Feedback/2.0"
    assert [r.final_recipient for r in result.recipients] == [SENT.email]
    assert SENT.message_id in result.original_message_ids
    # Sent to the feedback-loop address, the VERP is found in the returned original.
    assert any(decode_verp(c, KEYRING) == SENT.row_id for c in result.verp_candidates)


def test_auto_reply_is_not_a_bounce_even_at_the_verp_address() -> None:
    result = parsed("autoreply.eml")
    assert result.form == "not_bounce"
    assert "automatic reply" in result.reason
    assert result.recipients == ()


@pytest.mark.parametrize(
    "raw", [b"", b"   \n", (FIXTURES / "garbage.eml").read_bytes(), b"\xff\xfe\x00" * 1000]
)
def test_what_is_not_mail_is_unparseable_and_never_raises(raw: bytes) -> None:
    result = parse_bounce(raw)
    assert result.form == "unparseable"
    assert result.reason


def test_a_bounce_naming_nobody_without_verp_is_unparseable() -> None:
    raw = (
        b"From: MAILER-DAEMON@mx.example.jp\nSubject: Undelivered Mail Returned to Sender\n"
        b"To: bounces@shop.example.jp\n\nSomething went wrong.\n"
    )
    result = parse_bounce(raw)
    assert result.form == "unparseable" and "no recipient" in result.reason


def test_success_notifications_are_not_bounces() -> None:
    raw = (
        render_fixture("postfix_hard.eml", SENT, KEYRING)
        .replace(b"Action: failed", b"Action: delivered")
        .replace(b"Status: 5.1.1", b"Status: 2.0.0")
    )
    assert parse_bounce(raw).form == "not_bounce"


@pytest.mark.parametrize(
    ("action", "status", "diagnostic", "kind"),
    [
        ("failed", "5.1.1", "smtp; 550 5.1.1 user unknown", "hard"),
        ("failed", "5.2.1", None, "hard"),
        ("failed", "4.2.2", "smtp; 452 4.2.2 mailbox full", "soft"),
        ("delayed", "4.4.1", None, "soft"),
        ("delayed", "5.0.0", None, "soft"),  # delayed is never hard
        ("failed", "5.0.0", "smtp; 421 4.7.0 try again later", "soft"),  # doubt is soft
        ("failed", None, "smtp; 550 no such user", "hard"),
        ("failed", None, None, "soft"),
        (None, None, None, "soft"),
        ("delivered", "2.0.0", None, None),
        ("relayed", "2.0.0", None, None),
    ],
)
def test_hard_and_soft(
    action: str | None, status: str | None, diagnostic: str | None, kind: str | None
) -> None:
    assert classify_status(action, status, diagnostic) == kind


def test_verp_addresses_survive_what_mail_servers_do_to_them() -> None:
    assert VERP.startswith("bounces+k1.") and VERP.endswith("@shop.example.jp")
    for variant in (
        VERP,
        VERP.upper(),
        f"<{VERP}>",
        f'"Bounces" <{VERP}>',
        f"rfc822; {VERP}",
        VERP.replace("+", "-"),
        VERP.replace("+", "="),
    ):
        assert decode_verp(variant, KEYRING) == SENT.row_id, variant


def test_forged_or_foreign_verp_addresses_match_nothing() -> None:
    other = Keyring({"k1": bytes(range(1, 33))}, "k1")
    assert decode_verp(build_verp_address(other, 1, "shop.example.jp"), KEYRING) is None
    open_token = sign_token(KEYRING, "open", SENT.row_id)  # a token of another kind
    assert decode_verp(f"bounces+{open_token}@shop.example.jp", KEYRING) is None
    tampered = VERP.replace(".", ".a", 1)
    assert decode_verp(tampered, KEYRING) is None
    for junk in ("", "bounces@shop.example.jp", "@", "<>", "x" * 5000):
        assert decode_verp(junk, KEYRING) is None
    with pytest.raises(ValueError):
        build_verp_address(KEYRING, 1, "not a domain")
