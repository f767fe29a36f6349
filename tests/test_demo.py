"""The demo runs the whole pipeline, and what it prints agrees with the database and the sink."""

from __future__ import annotations

import re
from pathlib import Path

from mailkit.analytics import build_report, load_metrics
from mailkit.contacts import load_suppressions
from mailkit.demo import run_demo
from mailkit.storage import open_db


def test_demo_runs_end_to_end_and_its_numbers_agree(tmp_path: Path) -> None:
    lines: list[str] = []
    campaign_id = run_demo(tmp_path / "out", echo=lines.append)
    out = "\n".join(lines)

    db = open_db(f"sqlite:///{tmp_path / 'out' / 'mailkit.db'}")
    report = build_report(db, campaign_id)
    metrics = load_metrics(db, campaign_id).iloc[0]
    suppressed = load_suppressions(db)
    db.dispose()

    received = list((tmp_path / "out" / "maildir" / "new").iterdir())
    assert report.status == "finished"
    assert report.accepted == len(received) > 100
    assert report.bounced == 2 and report.rejected == 2
    assert report.recipients == report.accepted + report.rejected
    assert sorted(suppressed["reason"]) == ["hard_bounce", "hard_bounce", "unsubscribe"]
    assert f"{report.deliverability:.2f} %" in out
    # The generated file has invalid and duplicate rows, and the import reports each one.
    assert "4 rejected" in out and "duplicate of row" in out
    # Engagement went through the real tracking server: what the demo played is what was stored.
    played = re.search(r"(\d+) opened, (\d+) clicked, (\d+) unsubscribed", out)
    assert played is not None
    opened, clicked, unsubscribed = map(int, played.groups())
    assert metrics["openers"] == opened > 0
    assert metrics["clickers"] + metrics["machine_clickers"] == clicked > 0
    assert metrics["unsubscribes"] == unsubscribed == 1
    html = (tmp_path / "out" / "dashboard.html").read_text(encoding="utf-8")
    assert "春のセール" in html and '<script src="http' not in html
