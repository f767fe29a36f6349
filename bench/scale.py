"""A million contacts on SQLite and PostgreSQL, beside a pandas baseline.

    .venv/bin/python bench/scale.py [--rows N] [--backends sqlite,postgres]
                                    [--events-per-recipient K] [--cache DIR] [--pg URL]
                                    [--addresses sorted|shuffled]

Generates a CSV of N contacts (default 1,000,000: Japanese names, prefectures, gender, age and
a few invalid or duplicate rows) once into the cache folder, then on each backend, in a fresh
database (SQLite file / throw-away PostgreSQL schema), measures:

  import          import_contacts of the CSV into the empty store        target ≥ 50,000 rows/s
  re-import       the same file again (nothing changes; no target)
  segment count   count_segment("prefecture == '東京都' and gender == 'F'")  target ≤ 1 s
  snapshot        create_campaign + snapshot_campaign of everyone          target ≤ 20 s
  dashboard       load_dashboard over ~K events per recipient (default 10 → 10M events,
                  bulk-loaded through the driver first, then the engagement
                  summary and the events per minute rebuilt and the tables
                  analysed: untimed)                                       target ≤ 5 s
  start           start_campaign of a second campaign to everyone: what ``campaign send``
                  does before its first message (preflight of every member, then the
                  snapshot), no DKIM                                       no target
  pandas          read_csv of the same file + the segment filter in memory (baseline)

Every step runs in its own subprocess. "peak RSS" is that process's peak resident set size
(``ru_maxrss`` from ``os.wait4``: the interpreter and its imports included, see the
``baseline`` row, a process that only imports them; for the dashboard step it includes the
untimed event generation). "CPU" is the measured part's process CPU time (all threads); for
PostgreSQL "server CPU" is that of all the server's processes (backends, parallel workers),
read from /proc when the server is local (other sessions' work counts too). Times are
wall-clock: on a shared machine compare CPU against the load average printed at the top.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

PG_URL = os.environ.get("MAILKIT_TEST_PG", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
SEGMENT = "prefecture == '東京都' and gender == 'F'"
CSV_VERSION = 1  # bump when the generator changes, so cached files are regenerated
START = datetime(2026, 4, 1, 0, 0, tzinfo=UTC)
MB = 1024 * 1024
PREFECTURES = (  # noqa: SIM905
    "北海道 青森県 岩手県 宮城県 秋田県 山形県 福島県 茨城県 栃木県 群馬県 埼玉県 千葉県 東京都 "
    "神奈川県 新潟県 富山県 石川県 福井県 山梨県 長野県 岐阜県 静岡県 愛知県 三重県 滋賀県 京都府 "
    "大阪府 兵庫県 奈良県 和歌山県 鳥取県 島根県 岡山県 広島県 山口県 徳島県 香川県 愛媛県 高知県 "
    "福岡県 佐賀県 長崎県 熊本県 大分県 宮崎県 鹿児島県 沖縄県"
).split()
# Rough population weights: Tokyo, Kanagawa, Osaka, Aichi, Saitama... dominate.
WEIGHTS = [5 if p in ("東京都",) else 3 if p in ("神奈川県", "大阪府") else 1 for p in PREFECTURES]
SURNAMES = "佐藤 鈴木 高橋 田中 伊藤 渡辺 山本 中村 小林 加藤 吉田 山田 佐々木 山口".split()  # noqa: SIM905
GIVEN = "太郎 花子 翔太 美咲 大輔 陽菜 健太 さくら 拓也 結衣 直樹 愛 誠 七海 蓮 葵".split()  # noqa: SIM905
DOMAINS = ("gmail.com", "docomo.ne.jp", "ezweb.ne.jp", "softbank.ne.jp", "yahoo.co.jp")


# ---------------------------------------------------------------------------- data


def _local_part(i: int, shuffled: bool) -> str:
    """Contact i's mailbox name: ``user0000042``, or with ``shuffled`` a name whose sort order
    has nothing to do with i (as in a real list), so that address indexes are written at random
    places instead of appended to."""
    if not shuffled:
        return f"user{i:07d}"
    return f"{hashlib.blake2b(i.to_bytes(4, 'big'), digest_size=5).hexdigest()}.{i}"


def build_csv(path: Path, rows: int, *, seed: int = 2026, shuffled: bool = False) -> None:
    """N data rows; about 1 in 10,000 has a broken address or repeats an earlier one."""
    rng = random.Random(seed)
    tmp = path.with_suffix(".part")
    with tmp.open("w", encoding="utf-8", newline="") as fh:
        out = csv.writer(fh)
        out.writerow(["email", "氏名", "prefecture", "gender", "age"])
        for i in range(rows):
            email = f"{_local_part(i, shuffled)}@{DOMAINS[i % len(DOMAINS)]}"
            roll = rng.random()
            if roll < 0.00005:
                email = f"user{i}@@broken"
            elif roll < 0.0001 and i:  # a duplicate (or a miss)
                email = f"{_local_part(rng.randrange(i), shuffled)}@{DOMAINS[0]}"
            name = rng.choice(SURNAMES) + " " + rng.choice(GIVEN)
            prefecture = rng.choices(PREFECTURES, WEIGHTS)[0]
            out.writerow([email, name, prefecture, rng.choice("FM"), rng.randint(18, 79)])
    tmp.replace(path)


def _recipient_events(rng: random.Random, links: list[int]) -> Iterator[tuple[Any, ...]]:
    """(type, minutes after send, machine, link_id, detail) of one recipient, ~10 on average."""
    yield ("sent", 0, False, None, None)
    if rng.random() < 0.015:
        yield ("bounce", rng.randint(1, 600), False, None, '{"kind": "hard"}')
        return
    if rng.random() < 0.55:  # an image proxy opens at once, several times
        for _ in range(rng.randint(3, 14)):
            yield ("open", rng.randint(0, 30), True, None, None)
    if rng.random() < 0.05:  # a link scanner clicks everything
        for link in links:
            yield ("click", 1, True, link, None)
    if rng.random() < 0.45:  # a human reader
        base = int(rng.expovariate(1 / 240))
        for k in range(rng.randint(2, 14)):
            yield ("open", base + k * rng.randint(5, 600), False, None, None)
        if rng.random() < 0.35:
            for k in range(rng.randint(1, 6)):
                yield ("click", base + 1 + k * 7, False, rng.choice(links), None)
        if rng.random() < 0.01:
            yield ("unsubscribe", base + 2, False, None, None)


def load_events(db: Any, campaign_id: int, per_recipient: float) -> int:
    """Mark the ledger sent and bulk-load its events through the driver; the event count."""
    from sqlalchemy import insert, select, update

    from mailkit.storage.engagement import (
        create_engagement_triggers,
        drop_engagement_triggers,
        rebuild_engagement,
    )
    from mailkit.storage.event_minutes import (
        create_event_minute_triggers,
        drop_event_minute_triggers,
    )
    from mailkit.storage.schema import campaigns, links, messages

    rng = random.Random(7)
    with db.begin() as conn:
        link_ids = [
            conn.execute(
                insert(links)
                .values(
                    campaign_id=campaign_id, url=f"https://shop.example.jp/item/{p}", position=p
                )
                .returning(links.c.id)
            ).scalar_one()
            for p in range(1, 6)
        ]
        conn.execute(
            update(messages)
            .where(messages.c.campaign_id == campaign_id)
            .values(state="sent", attempts=1, smtp_code=250, sent_at=START, updated_at=START)
        )
        conn.execute(
            update(campaigns)
            .where(campaigns.c.id == campaign_id)
            .values(status="finished", started_at=START, finished_at=START + timedelta(hours=9))
        )
        ledger = conn.execute(
            select(messages.c.id, messages.c.contact_id)
            .where(messages.c.campaign_id == campaign_id)
            .order_by(messages.c.id)
        ).all()
    sqlite = db.dialect.name == "sqlite"
    if sqlite:  # PostgreSQL's replica role below skips triggers already
        with db.begin() as conn:
            drop_engagement_triggers(conn)
            drop_event_minute_triggers(conn)
    raw: Any = db.raw_connection()
    columns = "campaign_id, message_id, contact_id, type, occurred_at, machine, link_id, detail"
    scale = per_recipient / 10
    total = 0
    cur = raw.cursor()
    # Set-up, not the measured step: the generated rows are consistent by construction, so
    # the load skips foreign-key checks and builds the events indexes once at the end.
    if sqlite:
        cur.execute("PRAGMA foreign_keys=OFF")  # outside a transaction, or it is a no-op
        cur.execute("BEGIN")  # the pool's connections autocommit; SQLAlchemy sends BEGIN
        found = "SELECT name, sql FROM sqlite_master WHERE type='index' AND tbl_name='events'"
        indexes = [(f'"{n}"', sql) for n, sql in cur.execute(found).fetchall() if sql]
    else:
        cur.execute("SET session_replication_role = replica")  # needs a superuser, as in CI
        cur.execute(
            "SELECT indexrelid::regclass::text, pg_get_indexdef(indexrelid) FROM pg_index "
            "WHERE indrelid = 'events'::regclass AND NOT indisprimary"
        )
        indexes = cur.fetchall()
    for name, _ in indexes:
        cur.execute(f"DROP INDEX {name}")
    try:
        for lo in range(0, len(ledger), 50_000):
            rows = []
            for n, (mid, cid) in enumerate(ledger[lo : lo + 50_000], start=lo):
                sent = START + timedelta(minutes=n // 2000)  # ~2,000 messages a minute
                for kind, minutes, machine, link, detail in _recipient_events(rng, link_ids):
                    if kind in ("open", "click") and rng.random() > scale:
                        continue
                    when = sent + timedelta(minutes=minutes)
                    at = when.strftime("%Y-%m-%d %H:%M:%S.%f") if sqlite else when
                    rows.append((campaign_id, mid, cid, kind, at, machine, link, detail))
            if sqlite:
                marks = ", ".join("?" * 8)
                cur.executemany(f"INSERT INTO events ({columns}) VALUES ({marks})", rows)
            else:
                with cur.copy(f"COPY events ({columns}) FROM STDIN") as cp:
                    for row in rows:
                        cp.write_row(row)
            total += len(rows)
        for _, definition in indexes:
            cur.execute(definition)
        raw.commit()
        if sqlite:
            cur.execute("PRAGMA foreign_keys=ON")
        else:
            cur.execute("SET session_replication_role = DEFAULT")
        raw.commit()
    finally:
        raw.close()
    # The triggers of the engagement summary and the per-minute counts did not fire during
    # the load: build both in one pass each, and put the triggers back (SQLite), as after any
    # load that bypasses them.
    with db.begin() as conn:
        if sqlite:
            create_engagement_triggers(conn)
            create_event_minute_triggers(conn)
        rebuild_engagement(conn, [campaign_id])
    # Statistics, and on PostgreSQL the visibility map that index-only scans rely on
    # (autovacuum would set it some minutes after a real load).
    if sqlite:
        with db.begin() as conn:
            conn.exec_driver_sql("ANALYZE")
    else:
        with db.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            conn.exec_driver_sql("VACUUM ANALYZE")
    return total


# ---------------------------------------------------------------------------- steps (child side)


def _server_cpu(db: Any) -> Callable[[], float | None]:
    """Seconds of CPU the local PostgreSQL server used since now: all its processes, so that
    parallel workers (reaped ones are in the postmaster's children's times) and the several
    connections of the dashboard count; other sessions' work counts too."""
    if db.dialect.name != "postgresql":
        return lambda: None
    from sqlalchemy import text

    with db.connect() as conn:
        pid = conn.execute(text("SELECT pg_backend_pid()")).scalar_one()
    if not Path(f"/proc/{pid}").exists():
        return lambda: None  # not a local server

    def read() -> float:
        ticks = 0
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                if not (entry / "comm").read_text().startswith("postgres"):
                    continue
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue  # it ended meanwhile
            ticks += sum(int(f) for f in fields[11:15])  # utime, stime, cutime, cstime
        return ticks / os.sysconf("SC_CLK_TCK")

    start = read()
    return lambda: read() - start


def run_step(
    step: str, url: str, csv_path: Path, campaign: int | None, events: float
) -> dict[str, Any]:
    """Run one step in this process; what it measured."""
    import pandas as pd

    import mailkit
    from mailkit.storage import open_db

    if step == "baseline":
        return {"seconds": 0.0}
    if step == "pandas":
        started = time.perf_counter()
        frame = pd.read_csv(csv_path)
        count = int(((frame["prefecture"] == "東京都") & (frame["gender"] == "F")).sum())
        return {"seconds": time.perf_counter() - started, "count": count}
    db = open_db(url)
    server = _server_cpu(db)
    result: dict[str, Any]
    try:
        started, cpu = time.perf_counter(), time.process_time()
        if step in ("import", "re-import"):
            report = mailkit.import_contacts(db, csv_path)
            result = {"rows": report.rows, "added": report.added, "updated": report.updated,
                      "unchanged": report.unchanged, "rejected": len(report.rejected)}  # fmt: skip
        elif step == "segment count":
            result = {"count": mailkit.count_segment(db, SEGMENT)}
        elif step == "snapshot":
            mailkit.save_template(db, "scale", subject="春のお知らせ", html="<p>{{ name }} 様</p>")
            made = mailkit.create_campaign(
                db, "scale", template="scale", segment="all", from_addr="news@shop.example.jp"
            )
            result = {"ledger": mailkit.snapshot_campaign(db, made.id), "campaign": made.id}
        elif step == "start":
            mailkit.save_template(
                db, "start", subject="{{ name }}様へ", html="<p>{{ prefecture }} {{ name }} 様</p>"
            )
            made = mailkit.create_campaign(
                db, "start", template="start", segment="all", from_addr="news@shop.example.jp"
            )
            started, cpu, server = time.perf_counter(), time.process_time(), _server_cpu(db)
            begun = mailkit.start_campaign(db, made.id, dkim=False)
            result = {"ledger": begun.preflighted}
        elif step == "dashboard":
            assert campaign is not None
            try:
                from mailkit.analytics import load_dashboard
            except ImportError:  # TODO: the analytics package has no dashboard loader yet
                print("dashboard: not measured yet (no mailkit.analytics.load_dashboard)")
                return {"seconds": float("nan"), "server_cpu": None}
            loaded = load_events(db, campaign, events)
            # The bulk load is set-up, not the measured step.
            started, cpu, server = time.perf_counter(), time.process_time(), _server_cpu(db)
            dashboard = load_dashboard(db, campaign)
            result = {"events": loaded, "frames": len(dashboard.frames)}
        else:
            raise SystemExit(f"unknown step {step!r}")
        result["seconds"] = time.perf_counter() - started
        result["cpu"] = time.process_time() - cpu
        result["server_cpu"] = server()
    finally:
        db.dispose()
    return result


# ---------------------------------------------------------------------------- driver (parent side)


def spawn(
    step: str, url: str, csv_path: Path, campaign: int | None, events: float
) -> dict[str, Any]:
    """Run ``step`` in a subprocess; its result plus peak RSS and CPU from its rusage."""
    argv = [sys.executable, __file__, "--step", step, "--url", url, "--csv", str(csv_path),
            "--campaign", str(campaign or 0), "--events-per-recipient", str(events)]  # fmt: skip
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE)
    assert proc.stdout is not None
    output = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"step {step!r} failed with exit code {proc.returncode}")
    result: dict[str, Any] = json.loads(output.decode().strip().splitlines()[-1])
    result["peak_mb"] = usage.ru_maxrss / 1024  # kilobytes on Linux
    result.setdefault("cpu", usage.ru_utime + usage.ru_stime)
    return result


def fresh_database(backend: str, work: Path, pg: str) -> tuple[str, Callable[[], None]]:
    """URL of a new, migrated database on ``backend`` and how to drop it."""
    from sqlalchemy import create_engine, text

    from mailkit.storage import open_db

    if backend == "sqlite":
        path = work / f"scale-{uuid.uuid4().hex[:8]}.db"
        url = f"sqlite:///{path}"
        open_db(url).dispose()  # migrations are set-up, not the import

        def drop() -> None:
            for suffix in ("", "-wal", "-shm"):
                Path(f"{path}{suffix}").unlink(missing_ok=True)

        return url, drop
    admin = create_engine(pg, isolation_level="AUTOCOMMIT")
    schema = f"scale_{uuid.uuid4().hex[:8]}"
    with admin.connect() as conn:
        conn.execute(text(f'CREATE SCHEMA "{schema}"'))
    url = f"{pg}?options=-csearch_path%3D{schema}"
    open_db(url).dispose()

    def drop_schema() -> None:
        with admin.connect() as conn:
            conn.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
        admin.dispose()

    return url, drop_schema


TARGETS: dict[str, tuple[str, Callable[[dict[str, Any]], bool]]] = {
    "import": ("≥ 50,000 rows/s, ≤ 500 MB", lambda r: r["rate"] >= 50_000 and r["peak_mb"] <= 500),
    "segment count": ("≤ 1 s", lambda r: r["seconds"] <= 1),
    "snapshot": ("≤ 20 s", lambda r: r["seconds"] <= 20),
    "dashboard": ("≤ 5 s", lambda r: r["seconds"] <= 5),
}


def print_table(results: list[tuple[str, str, dict[str, Any]]]) -> None:
    head = f"{'step':<14} {'backend':<9} {'time':>8} {'rate':>14} {'peak RSS':>9} {'CPU':>7} "
    print("\n" + head + f"{'server CPU':>10}  {'target':<26} verdict  notes")
    for step, backend, r in results:
        rate = f"{r['rate']:,.0f} rows/s" if "rate" in r else ""
        server = f"{r['server_cpu']:.1f} s" if r.get("server_cpu") is not None else ""
        target, check = TARGETS.get(step, ("", lambda _r: True))
        verdict = ("ok" if check(r) else "MISSED") if target else ""
        notes = ", ".join(f"{k}={v:,}" for k, v in r.items() if k in (
            "rows", "added", "unchanged", "rejected", "count", "ledger", "events"))  # fmt: skip
        print(f"{step:<14} {backend:<9} {r['seconds']:7.2f}s {rate:>14} {r['peak_mb']:7.0f}MB "
              f"{r['cpu']:6.1f}s {server:>10}  {target:<26} {verdict:<8} {notes}")  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--backends", default="sqlite,postgres")
    parser.add_argument("--events-per-recipient", type=float, default=10.0)
    parser.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "mailkit-bench")
    parser.add_argument("--pg", default=PG_URL, help="PostgreSQL admin URL [MAILKIT_TEST_PG]")
    parser.add_argument(
        "--addresses",
        choices=("sorted", "shuffled"),
        default="sorted",
        help="sorted: user0000001@... in row order (the default, as in earlier runs); "
        "shuffled: addresses in random order, as in a real list",
    )
    parser.add_argument("--step", help=argparse.SUPPRESS)
    parser.add_argument("--url", help=argparse.SUPPRESS)
    parser.add_argument("--csv", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--campaign", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.step:  # a child process: one step, one JSON line
        result = run_step(args.step, args.url, args.csv, args.campaign, args.events_per_recipient)
        print(json.dumps(result))
        return 0

    args.cache.mkdir(parents=True, exist_ok=True)
    shuffled = args.addresses == "shuffled"
    kind = "-shuffled" if shuffled else ""
    csv_path = args.cache / f"contacts-{args.rows}{kind}-v{CSV_VERSION}.csv"
    if not csv_path.exists():
        print(f"generating {csv_path} ...", flush=True)
        build_csv(csv_path, args.rows, shuffled=shuffled)
    print(f"{csv_path}: {args.rows:,} rows, {csv_path.stat().st_size / MB:,.0f} MB; "
          f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at start")  # fmt: skip
    results: list[tuple[str, str, dict[str, Any]]] = []

    def record(step: str, backend: str, result: dict[str, Any]) -> dict[str, Any]:
        if step in ("import", "re-import"):
            result["rate"] = result["rows"] / result["seconds"]
        results.append((step, backend, result))
        print(f"  {backend:<9} {step:<14} {result['seconds']:7.2f} s  "
              f"peak {result['peak_mb']:.0f} MB", flush=True)  # fmt: skip
        return result

    record("baseline", "-", spawn("baseline", "", csv_path, None, 0))
    for backend in [b.strip() for b in args.backends.split(",") if b.strip()]:
        work = Path(tempfile.mkdtemp(prefix="scale-", dir=args.cache))
        try:
            url, drop = fresh_database(backend, work, args.pg)
        except Exception as exc:
            print(f"  {backend}: not available ({exc.__class__.__name__}: {exc}); skipped")
            shutil.rmtree(work, ignore_errors=True)
            continue
        try:
            ev = args.events_per_recipient
            for step in ("import", "re-import", "segment count", "snapshot"):
                done = record(step, backend, spawn(step, url, csv_path, None, ev))
            record("dashboard", backend, spawn("dashboard", url, csv_path, done["campaign"], ev))
            record("start", backend, spawn("start", url, csv_path, None, ev))
        finally:
            drop()
            shutil.rmtree(work, ignore_errors=True)
    record("pandas", "in memory", spawn("pandas", "", csv_path, None, 0))
    print_table(results)
    print(f"\nload average {os.getloadavg()[0]:.1f} at the end")
    return 0


if __name__ == "__main__":
    sys.exit(main())
