"""The real `mailkit` command, run as a subprocess, checked against the database and the sink."""

from __future__ import annotations

import json
import subprocess
import sys
from email import message_from_bytes, policy
from pathlib import Path

import pytest
from sqlalchemy import select

from mailkit.sink import Sink
from mailkit.storage import open_db
from mailkit.storage.schema import messages, suppressions

CONTACTS = [
    ("メールアドレス", "氏名", "prefecture", "gender", "age"),
    ("hanako.yamada@example.jp", "山田花子", "東京都", "F", "34"),
    ("taro.sato@example.jp", "佐藤太郎", "東京都", "M", "41"),
    ("yui.suzuki@docomo.ne.jp", "鈴木結衣", "東京都", "F", "29"),
    ("sakura.ito@ezweb.ne.jp", "伊藤さくら", "大阪府", "F", "52"),
    ("misaki.kato@example.co.jp", "加藤美咲", "東京都", "F", "38"),
    ("ghost@example.jp", "幽霊", "東京都", "F", "60"),
    ("broken@@example.jp", "壊れた", "東京都", "F", "30"),
]


def mailkit(db_url: str, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        [sys.executable, "-m", "mailkit.cli", "--db", db_url, *args],
        capture_output=True,
        text=True,
        timeout=120,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"mailkit {args} failed ({proc.returncode}):\n{proc.stderr}")
    return proc


def mailkit_json(db_url: str, *args: str) -> dict[str, object]:
    out = mailkit(db_url, *args, "--json").stdout
    data: dict[str, object] = json.loads(out)  # exactly one JSON document on stdout
    return data


@pytest.fixture
def workspace(tmp_path: Path) -> tuple[str, Path]:
    csv_path = tmp_path / "contacts.csv"
    with csv_path.open("w", encoding="cp932", newline="") as fh:
        for row in CONTACTS:
            fh.write(",".join(row) + "\r\n")
    (tmp_path / "spring.html").write_text(
        "<p>{{ name }} 様</p><p>{{ prefecture }}の会員様へ春のご案内です。</p>"
        '<p><a href="https://shop.example.jp/spring">セール会場</a></p>'
        '<p><a href="{{ unsubscribe_url }}">配信停止</a></p>',
        encoding="utf-8",
    )
    return f"sqlite:///{tmp_path}/ws.db", tmp_path


def test_csv_to_report_one_message_per_recipient(workspace: tuple[str, Path]) -> None:
    db_url, folder = workspace
    assert mailkit_json(db_url, "init")["revision"]

    imported = mailkit_json(db_url, "contacts", "import", str(folder / "contacts.csv"))
    assert imported["added"] == 6
    assert imported["encoding"] == "cp932"
    rejected = imported["rejected"]
    assert isinstance(rejected, list) and len(rejected) == 1
    assert rejected[0]["row"] == 8 and rejected[0]["value"] == "broken@@example.jp"

    expr = "prefecture == '東京都' and gender == 'F'"
    assert mailkit_json(db_url, "segment", "count", expr)["count"] == 4

    mailkit(
        db_url,
        "template",
        "add",
        "spring",
        "--subject",
        "{{ name }}様へ 春のご案内",
        "--html",
        str(folder / "spring.html"),
    )
    created = mailkit_json(
        db_url,
        "campaign",
        "create",
        "春",
        "--template",
        "spring",
        "--segment",
        expr,
        "--from",
        "ショップ <news@shop.example.jp>",
        "--tracking-url",
        "https://t.shop.example.jp",
    )
    campaign_id = str(created["id"])

    refused = "550 5.1.1 <ghost@example.jp>: Recipient address rejected: User unknown"
    with Sink(maildir=folder / "maildir", rcpt_replies={"ghost@example.jp": refused}) as sink:
        sent = mailkit_json(db_url, "campaign", "send", campaign_id, "--smtp", sink.url)
        received = sink.messages()
        envelopes = sink.envelopes()

    assert sent["status"] == "finished"
    recipients = {
        "hanako.yamada@example.jp",
        "yui.suzuki@docomo.ne.jp",
        "misaki.kato@example.co.jp",
    }
    all_addresses = {row[0] for row in CONTACTS[1:]}
    assert sorted(e.rcpt_tos[0] for e in envelopes) == sorted(recipients)
    assert all(len(e.rcpt_tos) == 1 for e in envelopes)
    for envelope in envelopes:
        (rcpt,) = envelope.rcpt_tos
        msg = message_from_bytes(envelope.data, policy=policy.default)
        assert msg["To"].addresses[0].addr_spec == rcpt
        assert len(msg["To"].addresses) == 1
        assert msg["Cc"] is None and msg["Bcc"] is None
        raw = envelope.data.decode("utf-8", "replace").lower()
        for other in all_addresses - {rcpt}:
            assert other not in raw, f"{other} leaked into the message for {rcpt}"
        assert msg["Subject"].endswith("様へ 春のご案内")
        # Tracking: VERP envelope sender, RFC 8058 one-click unsubscribe, tracked links.
        assert envelope.mail_from.startswith("bounces+")
        assert envelope.mail_from.endswith("@shop.example.jp")
        assert msg["List-Unsubscribe"].startswith("<https://t.shop.example.jp/u/")
        assert msg["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
        html = msg.get_body(("html",)).get_content()
        assert "https://t.shop.example.jp/c/" in html and "/o/" in html
        assert "https://shop.example.jp/spring" not in html
    assert len({m["Message-ID"] for m in received}) == 3
    assert all(m["Date"] for m in received)
    assert len(list((folder / "maildir" / "new").iterdir())) == 3

    report = mailkit_json(db_url, "report", campaign_id)
    assert report["recipients"] == 4
    assert report["sent"] == 4 and report["accepted"] == 3 and report["rejected"] == 1
    assert report["bounced"] == 1 and report["failed"] == 1
    assert report["deliverability"] == 75.0

    db = open_db(db_url)
    with db.connect() as conn:
        ghost = conn.execute(
            select(messages.c.state, messages.c.smtp_code).where(
                messages.c.email == "ghost@example.jp"
            )
        ).one()
        suppressed = conn.execute(select(suppressions.c.email, suppressions.c.reason)).all()
    db.dispose()
    assert tuple(ghost) == ("failed", 550)
    assert [tuple(s) for s in suppressed] == [("ghost@example.jp", "hard_bounce")]
    # A suppressed address leaves every segment.
    assert mailkit_json(db_url, "segment", "count", expr)["count"] == 3

    text_report = mailkit(db_url, "report", campaign_id).stdout
    assert "deliverability" in text_report and "75.00 %" in text_report


def test_reimport_of_the_same_file_changes_nothing(workspace: tuple[str, Path]) -> None:
    db_url, folder = workspace
    mailkit_json(db_url, "contacts", "import", str(folder / "contacts.csv"))
    again = mailkit_json(db_url, "contacts", "import", str(folder / "contacts.csv"))
    assert (again["added"], again["updated"], again["unchanged"]) == (0, 0, 6)


def test_errors_go_to_stderr_with_nonzero_exit(workspace: tuple[str, Path]) -> None:
    db_url, folder = workspace
    mailkit_json(db_url, "contacts", "import", str(folder / "contacts.csv"))
    proc = mailkit(db_url, "segment", "count", "__import__('os')", "--json", check=False)
    assert proc.returncode == 1
    assert proc.stdout == ""
    assert proc.stderr.startswith("error:")

    proc = mailkit(db_url, "contacts", "import", str(folder / "missing.csv"), check=False)
    assert proc.returncode != 0 and "missing.csv" in proc.stderr

    proc = mailkit(db_url, "report", "99", check=False)
    assert proc.returncode == 1 and "campaign" in proc.stderr

    proc = mailkit(db_url, "campaign", "send", "1", check=False)  # no --smtp
    assert proc.returncode == 2


def test_preflight_failure_sends_nothing(workspace: tuple[str, Path]) -> None:
    db_url, folder = workspace
    mailkit_json(db_url, "contacts", "import", str(folder / "contacts.csv"))
    (folder / "bad.html").write_text("<p>{{ name }} {{ coupon_code }}</p>", encoding="utf-8")
    mailkit(db_url, "template", "add", "bad", "--subject", "hi", "--html", str(folder / "bad.html"))
    created = mailkit_json(
        db_url,
        "campaign",
        "create",
        "x",
        "--template",
        "bad",
        "--segment",
        "age >= 30",
        "--from",
        "news@shop.example.jp",
    )
    with Sink() as sink:
        proc = mailkit(
            db_url, "campaign", "send", str(created["id"]), "--smtp", sink.url, check=False
        )
        assert sink.count == 0
    assert proc.returncode == 1
    assert "coupon_code" in proc.stderr
    assert "nothing was sent" in proc.stderr
    report = mailkit_json(db_url, "report", str(created["id"]))
    assert report["status"] == "draft" and report["recipients"] == 0


def test_sink_command_receives_and_stores_until_terminated(tmp_path: Path) -> None:
    import signal
    import smtplib

    maildir = tmp_path / "inbox"
    proc = subprocess.Popen(
        [sys.executable, "-m", "mailkit.cli", "sink", "--port", "0", "--maildir", str(maildir)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        first = proc.stdout.readline()  # "sink listening on smtp://127.0.0.1:PORT, ..."
        assert "sink listening on smtp://127.0.0.1:" in first, first + proc.stderr.read()
        port = int(first.split("smtp://127.0.0.1:")[1].split(",")[0])
        with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
            client.sendmail(
                "a@example.jp",
                ["b@example.jp"],
                "Subject: hi\r\nFrom: a@example.jp\r\nTo: b@example.jp\r\n\r\nbody\r\n",
            )
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
    assert proc.returncode == 0
    stored = list((maildir / "new").iterdir())
    assert len(stored) == 1 and b"Subject: hi" in stored[0].read_bytes()
