"""Dashboards: figures built from the metric frames, the offline HTML page and `report --html`."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import plotly.graph_objects as go
import pytest
from sqlalchemy import Engine
from test_analytics import FROM, World, build_world, import_people, send_to_sink

import mailkit
from mailkit.analytics import (
    METRIC_DEFINITIONS,
    build_funnel_figure,
    build_kpi_figure,
    build_rate_figure,
    build_timeline_figure,
    build_trend_figure,
    load_dashboard,
    load_metrics,
    render_dashboard_html,
    save_dashboard_html,
)
from mailkit.storage import open_db


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    db = open_db(f"sqlite:///{tmp_path_factory.mktemp('dashboard')}/mailkit.db")
    yield build_world(db)
    db.dispose()


def plotted(page: str) -> list[dict[str, object]]:
    """The data arrays of every figure on a page, as the browser will receive them."""
    calls = re.findall(r"Plotly\.newPlot\(\s*\"[^\"]+\",\s*(\[.*?\]),\s*\{", page, flags=re.S)
    return [trace for call in calls for trace in json.loads(call)]


def test_figures_carry_the_metric_frames(world: World) -> None:
    metrics = load_metrics(world.db, world.campaign_id)
    funnel = build_funnel_figure(metrics)
    assert isinstance(funnel, go.Figure)
    assert list(funnel.data[0].x) == [10, 8, 4, 2]  # sent, delivered, opened, clicked

    kpi = build_kpi_figure(metrics)
    values = {t.title.text: t.value for t in kpi.data}
    assert values["到達率 deliverability"] == pytest.approx(80.0)
    assert values["open rate (human)"] == pytest.approx(50.0)
    assert values["click-to-open"] == pytest.approx(50.0)

    dash = load_dashboard(world.db, world.campaign_id)
    assert set(dash.figures) >= {"kpi", "funnel", "timeline", "domains", "links", "campaigns"}
    assert {"attribute:prefecture", "attribute:gender"} <= set(dash.figures)
    domains = dash.figures["domains"].data[0]
    assert list(domains.x) == ["example.jp", "SoftBank", "au", "docomo", "example.co.jp"]
    assert domains.y[2] == pytest.approx(100.0)  # au's open rate
    assert domains.y[1] == pytest.approx(0.0)  # SoftBank: delivered 1, no opener
    hokkaido = list(dash.figures["attribute:prefecture"].data[0].x).index("北海道")
    assert dash.figures["attribute:prefecture"].data[0].y[hokkaido] is None  # undefined: no bar
    timeline = dash.figures["timeline"]
    assert list(timeline.data[2].y) == dash.frames["timeline"]["clicks"].tolist()
    link_cells = dash.figures["links"].data[0].cells.values
    assert "https://shop.example.jp/spring" in link_cells[1]


def test_html_is_self_contained_and_shows_data_and_definitions(
    world: World, tmp_path: Path
) -> None:
    path = save_dashboard_html(world.db, world.campaign_id, tmp_path / "out" / "dash.html")
    page = path.read_text(encoding="utf-8")
    assert not re.search(r"<script[^>]+src\s*=\s*[\"']?https?:", page, flags=re.I)
    assert "<link" not in page
    assert page.count("Plotly.newPlot(") >= 7
    # plotly.js is embedded exactly once (its licence banner opens the bundle).
    assert len(re.findall(r"plotly\.js v\d", page)) == 1
    traces = plotted(page)
    funnel = next(t for t in traces if t["type"] == "funnel")
    assert funnel["x"] == [10, 8, 4, 2]
    assert any(t.get("x") == ["東京都", "大阪府", "(none)", "北海道"] for t in traces)
    table = next(t for t in traces if t["type"] == "table")
    assert table["cells"]["values"][1] == [
        "https://shop.example.jp/spring",
        "https://shop.example.jp/",
    ]
    for name, definition in METRIC_DEFINITIONS.items():
        assert f"<th>{name}</th>" in page
        assert definition.split(":")[0].replace("&", "&amp;").replace("<", "&lt;") in page
    assert "春" in page  # the campaign's Japanese name, as UTF-8


def test_report_command_writes_the_dashboard(world: World, tmp_path: Path) -> None:
    url = world.db.url.render_as_string(hide_password=False)
    target = tmp_path / "report.html"
    proc = subprocess.run(
        [sys.executable, "-m", "mailkit.cli", "--db", url, "report", str(world.campaign_id),
         "--html", str(target), "--json"],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert data["html"] == str(target) and data["deliverability"] == 80.0
    assert data["delivered"] == 8
    assert "Plotly.newPlot(" in target.read_text(encoding="utf-8")


def test_empty_draft_and_sending_campaigns_render_with_a_note(db: Engine) -> None:
    import_people(db)
    draft = mailkit.create_campaign(db, "下書き", template="spring", segment="", from_addr=FROM)
    nobody = send_to_sink(db, segment="prefecture == '沖縄県'")
    sending = mailkit.create_campaign(db, "送信中", template="spring", segment="", from_addr=FROM)
    mailkit.snapshot_campaign(db, sending.id)
    quiet = send_to_sink(db, segment="gender == 'F'")  # sent, but nobody opened
    expected = {
        draft.id: "no recipients yet",
        nobody: "no recipients yet",
        sending.id: "still sending: 10 of 10",
        quiet: "no human opens recorded",
    }
    for campaign_id, note in expected.items():
        dash = load_dashboard(db, campaign_id)
        assert any(note in n for n in dash.notes), (campaign_id, dash.notes)
        page = render_dashboard_html(dash)
        assert note in page
        assert "Plotly.newPlot(" in page
    empty = load_metrics(db, draft.id)
    assert build_funnel_figure(empty).layout.annotations[0].text.startswith("nothing sent")
    assert build_rate_figure(empty.iloc[0:0], title="x").layout.annotations
    assert build_timeline_figure(load_dashboard(db, quiet).frames["timeline"]).layout.annotations
    assert build_trend_figure(load_dashboard(db, draft.id).frames["campaigns"]).data
