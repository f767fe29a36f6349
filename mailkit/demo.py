"""The demo: the whole pipeline on generated Japanese contacts and the embedded sink.

It writes a contact file the way Excel saves Japanese CSVs (CP932), with a few invalid and
duplicate rows, imports it, builds a segment, stores a template, starts the tracking server
(`mailkit serve`, a real uvicorn process on a free port), sends the campaign to the embedded sink
(told to refuse two addresses, to show bounce handling), plays some recipients opening and
clicking over real HTTP, one unsubscribing with RFC 8058 one-click, and prints the report and
writes the HTML dashboard.
"""

from __future__ import annotations

import csv
import random
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from email import message_from_bytes, policy
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
<p><a href="https://shop.example.jp/coupon?c=SPRING20">クーポンを受け取る</a></p>
{% if unsubscribe_url is defined %}<p><a href="{{ unsubscribe_url }}">配信停止</a></p>{% endif %}
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


# What a person's mail client says it is: the tracking server's machine rules let it through.
BROWSER_UA = (
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) "
    "Chrome/131.0 Safari/537.36"
)


@contextmanager
def _tracking_server(db_url: str) -> Iterator[str]:
    """`mailkit serve` in its own process on a free port; yields its URL, stops it on exit."""
    proc = subprocess.Popen(  # noqa: S603  (our own interpreter and command, no shell)
        [sys.executable, "-m", "mailkit.cli", "--db", db_url, "serve", "--port", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None and proc.stderr is not None
        line = proc.stdout.readline()
        if "listening on " not in line:
            raise RuntimeError(f"the tracking server did not start: {proc.stderr.read()}")
        yield line.split("listening on ", 1)[1].strip()
    finally:
        proc.send_signal(signal.SIGTERM)  # it writes every accepted event before leaving
        proc.wait(timeout=60)


def _engage(maildir: Path, *, seed: int = 11) -> dict[str, int]:
    """Play recipients: ~40 % open, a third of those click, one unsubscribes (one-click POST)."""
    rng = random.Random(seed)
    done = {"opens": 0, "clicks": 0, "unsubscribes": 0}
    for path in sorted((maildir / "new").iterdir()):
        msg = message_from_bytes(path.read_bytes(), policy=policy.default)
        body = msg.get_body(("html",))
        if body is None or rng.random() > 0.4:
            continue
        html = body.get_content()
        pixel = re.search(r'src="([^"]+/o/[^"]+\.gif)"', html)
        if pixel:
            _request(pixel.group(1))
            done["opens"] += 1
        if rng.random() < 0.35:
            link = re.search(r'href="([^"]+/c/[^"]+)"', html)
            if link:
                _request(link.group(1).replace("&amp;", "&"))
                done["clicks"] += 1
        if done["unsubscribes"] == 0:
            unsubscribe = str(msg["List-Unsubscribe"]).split(">")[0].lstrip("<")
            _request(unsubscribe, data=b"List-Unsubscribe=One-Click")
            done["unsubscribes"] += 1
    return done


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: object, **kwargs: object) -> None:
        return None  # the click's 302 is the answer; the shop's site does not exist


def _request(url: str, data: bytes | None = None) -> int:
    if not url.startswith(("http://", "https://")):
        raise ValueError(f"not a tracking URL: {url!r}")
    request = urllib.request.Request(  # noqa: S310  (http(s) only, checked above)
        url, data=data, headers={"User-Agent": BROWSER_UA}
    )
    opener = urllib.request.build_opener(_NoRedirect)
    try:
        with opener.open(request, timeout=30) as response:
            status: int = response.status
    except urllib.error.HTTPError as exc:  # 302 without a followed redirect lands here
        status = exc.code
    return status


def run_demo(directory: Path, *, echo: Callable[[str], None] = print) -> int:
    """Run the demo in ``directory`` (emptied first); return the campaign id."""
    from .analytics import build_report, load_metrics, save_dashboard_html
    from .campaigns import create_campaign
    from .cli import format_report
    from .contacts import import_contacts
    from .dispatch import send_campaign, unpaced_rules
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
    maildir = directory / "maildir"
    replies = {
        addr: f"550 5.1.1 <{addr}>: Recipient address rejected: User unknown" for addr in refused
    }
    with _tracking_server(f"sqlite:///{db_path}") as tracking_url:
        campaign = create_campaign(
            db,
            "春のセール",
            template="spring-sale",
            segment=SEGMENT,
            from_addr=SENDER,
            tracking_url=tracking_url,
        )
        echo(
            f"3. campaign {campaign.id} created; tracking server (mailkit serve) on {tracking_url}"
        )
        with Sink(maildir=maildir, rcpt_replies=replies) as server:
            echo(f"4. embedded SMTP sink on {server.url} (refuses {len(refused)} addresses)")
            # The sink is local: lift the per-domain pacing meant for real carriers' servers.
            result = send_campaign(
                db, campaign.id, server.url, concurrency=4, pacing=unpaced_rules()
            )
            received = server.count
        echo(f"5. sent: {result.outcomes}; the sink received {received} messages")
        played = _engage(maildir)
        echo(
            f"6. recipients played over HTTP: {played['opens']} opened, {played['clicks']} "
            f"clicked, {played['unsubscribes']} unsubscribed (one-click POST)"
        )
    echo("")
    echo(format_report(build_report(db, campaign.id)))
    metrics = load_metrics(db, campaign.id).iloc[0]
    echo(f"  open rate       {metrics['open_rate']:>7.2f} %   = openers / delivered")
    echo(
        f"  click rate      {metrics['click_rate']:>7.2f} %   = human clickers / delivered; "
        f"{int(metrics['machine_clickers'])} recipients' clicks came seconds after delivery and"
        " are flagged as link-scanner clicks, as a security gateway's would be"
    )
    dashboard = save_dashboard_html(db, campaign.id, directory / "dashboard.html")
    echo("")
    echo(f"database:          {db_path}")
    echo(f"received messages: {maildir}/new")
    echo(f"contact file:      {csv_path}")
    echo(f"dashboard:         {dashboard}")
    echo(f"try: mailkit --db sqlite:///{db_path} report {campaign.id}")
    echo(f"demo finished in {time.perf_counter() - started:.1f} s")
    db.dispose()
    return campaign.id
