"""The demo: the whole pipeline on generated Japanese contacts and the embedded sink.

It writes a contact file the way Excel saves Japanese CSVs (CP932), with a few invalid and
duplicate rows, imports it, builds a segment, stores a template, sends the campaign to the
embedded sink (told to refuse two addresses, to show bounce handling) and prints the report.
"""

from __future__ import annotations

import csv
import random
import shutil
import time
from collections.abc import Callable
from pathlib import Path

SURNAMES = [
    ("佐藤", "sato"),
    ("鈴木", "suzuki"),
    ("高橋", "takahashi"),
    ("田中", "tanaka"),
    ("伊藤", "ito"),
    ("渡辺", "watanabe"),
    ("山本", "yamamoto"),
    ("中村", "nakamura"),
    ("小林", "kobayashi"),
    ("加藤", "kato"),
    ("吉田", "yoshida"),
    ("山田", "yamada"),
    ("佐々木", "sasaki"),
    ("松本", "matsumoto"),
    ("井上", "inoue"),
    ("木村", "kimura"),
]
GIVEN = [
    ("太郎", "taro", "M"),
    ("健太", "kenta", "M"),
    ("大輔", "daisuke", "M"),
    ("翔", "sho", "M"),
    ("蓮", "ren", "M"),
    ("花子", "hanako", "F"),
    ("陽子", "yoko", "F"),
    ("美咲", "misaki", "F"),
    ("結衣", "yui", "F"),
    ("さくら", "sakura", "F"),
]
PREFECTURES = ["東京都", "東京都", "東京都", "神奈川県", "大阪府", "愛知県", "福岡県", "北海道"]
DOMAINS = ["example.jp", "example.co.jp", "docomo.ne.jp", "ezweb.ne.jp", "softbank.ne.jp"]

TEMPLATE_HTML = """\
<html><body style="font-family: sans-serif">
<p>{{ name }} 様</p>
<p>いつもご利用ありがとうございます。{{ prefecture }}にお住まいの会員様限定で、
春のセールのご案内をお送りします。</p>
<ul>
  <li>全品 20% オフ（3月31日まで）</li>
  <li>{{ age }}歳のお誕生月の方にはポイント2倍</li>
</ul>
<p><a href="https://shop.example.jp/spring">セール会場はこちら</a></p>
<p>配信停止をご希望の方はこのメールにご返信ください。</p>
</body></html>
"""
SUBJECT = "{{ name }}様へ 春のセールのご案内"
SEGMENT = "prefecture in ['東京都', '神奈川県'] and age >= 30"
SENDER = "ショップ通信 <news@shop.example.jp>"


def build_demo_contacts(path: Path, *, count: int = 400, seed: int = 7) -> list[str]:
    """Write a CP932 contact CSV like Excel's; return the addresses the sink should refuse."""
    rng = random.Random(seed)
    rows: list[list[str]] = []
    for i in range(count):
        (sur, sur_r), (given, given_r, gender) = rng.choice(SURNAMES), rng.choice(GIVEN)
        email = f"{given_r}.{sur_r}{i}@{rng.choice(DOMAINS)}"
        rows.append(
            [email, f"{sur}{given}", rng.choice(PREFECTURES), gender, str(rng.randint(18, 75))]
        )
    # What real lists contain: a duplicate with different case, broken addresses, an empty cell.
    local, domain = rows[3][0].split("@")
    rows.insert(10, [f" {local}@{domain.upper()} ", rows[3][1], *rows[3][2:]])
    rows.insert(50, ["tanaka@@example.jp", "田中一郎", "東京都", "M", "40"])
    rows.insert(90, ["yamada.example.jp", "山田次郎", "大阪府", "M", "35"])
    rows.insert(120, ["", "名無し", "東京都", "F", "33"])
    with path.open("w", encoding="cp932", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["メールアドレス", "氏名", "prefecture", "gender", "age"])
        writer.writerows(rows)
    # Two members of the segment whose mailboxes "do not exist" at the sink.
    in_segment = [
        r[0]
        for r in rows
        if r[2] in ("東京都", "神奈川県")
        and r[4].isdigit()
        and int(r[4]) >= 30
        and "@" in r[0]
        and "@@" not in r[0]
    ]
    return [in_segment[5].lower(), in_segment[17].lower()]


def run_demo(directory: Path, *, echo: Callable[[str], None] = print) -> int:
    """Run the demo in ``directory`` (emptied first); return the campaign id."""
    from .analytics import build_report
    from .campaigns import create_campaign
    from .cli import format_report
    from .contacts import import_contacts
    from .dispatch import send_campaign
    from .segments import count_segment
    from .sink import Sink
    from .storage import open_db
    from .templates import save_template

    started = time.perf_counter()
    if directory.exists():
        shutil.rmtree(directory)
    directory.mkdir(parents=True)
    db_path = directory / "mailkit.db"
    db = open_db(f"sqlite:///{db_path}")

    csv_path = directory / "contacts_cp932.csv"
    refused = build_demo_contacts(csv_path)
    report = import_contacts(db, csv_path, list_name="会員")
    echo(
        f"1. imported {csv_path.name} ({report.encoding}): {report.added} added, "
        f"{report.updated} updated, {report.unchanged} unchanged, {len(report.rejected)} rejected"
    )
    for bad in report.rejected:
        echo(f"     row {bad.row}: {bad.value!r}: {bad.reason}")

    echo(f"2. segment {SEGMENT!r}: {count_segment(db, SEGMENT)} contacts")
    save_template(db, "spring-sale", subject=SUBJECT, html=TEMPLATE_HTML)
    campaign = create_campaign(
        db, "春のセール", template="spring-sale", segment=SEGMENT, from_addr=SENDER
    )
    echo(f"3. campaign {campaign.id} created from template 'spring-sale'")

    maildir = directory / "maildir"
    replies = {
        addr: f"550 5.1.1 <{addr}>: Recipient address rejected: User unknown" for addr in refused
    }
    with Sink(maildir=maildir, rcpt_replies=replies) as server:
        echo(f"4. embedded SMTP sink on {server.url} (refuses {len(refused)} addresses)")
        result = send_campaign(db, campaign.id, server.url, concurrency=4)
        received = server.count
    echo(f"5. sent: {result.outcomes}; the sink received {received} messages")
    echo("")
    echo(format_report(build_report(db, campaign.id)))
    echo("")
    echo(f"database:          {db_path}")
    echo(f"received messages: {maildir}/new")
    echo(f"contact file:      {csv_path}")
    echo(f"try: mailkit --db sqlite:///{db_path} report {campaign.id}")
    echo(f"demo finished in {time.perf_counter() - started:.1f} s")
    db.dispose()
    return campaign.id
