"""The notebooks, executed headless by papermill in real kernels on temporary workspaces.

The demo chain (01 … 05, then scheduled_campaign) runs once for the module: kernels take
seconds to start, so the tests read its executed notebooks instead of re-running them.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import nbformat
import pytest
from papermill.exceptions import PapermillExecutionError
from sqlalchemy import Engine, select

import mailkit
from mailkit import Sink
from mailkit.demo_notebooks import DEMO_NOTEBOOKS, execute_notebook, run_notebook_demo
from mailkit.storage.schema import campaigns

SECRET = "s3cr3t-xyz"


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("notebook-demo") / "out"
    lines: list[str] = []
    run_notebook_demo(directory, echo=lines.append)
    assert any("the sink received" in line for line in lines)
    return directory


@pytest.fixture
def demo_db(demo: Path) -> Any:
    engine = mailkit.open_db(f"sqlite:///{demo / 'mailkit.db'}")
    yield engine
    engine.dispose()


def _record(path: Path) -> dict[str, Any]:
    """The application/json output of the cell tagged ``record``."""
    book = nbformat.read(path, as_version=4)
    (cell,) = [c for c in book.cells if "record" in c.metadata.get("tags", [])]
    (output,) = [o for o in cell.outputs if "application/json" in o.get("data", {})]
    data: dict[str, Any] = output["data"]["application/json"]
    return data


def _errors(path: Path) -> list[str]:
    book = nbformat.read(path, as_version=4)
    return [
        f"{o.ename}: {o.evalue}"
        for c in book.cells
        if c.cell_type == "code"
        for o in c.outputs
        if o.output_type == "error"
    ]


def test_demo_chain_runs_every_notebook_and_records_what_was_done(
    demo: Path, demo_db: Engine
) -> None:
    executed = {p.stem for p in (demo / "executed").glob("*.ipynb")}
    assert executed == set(DEMO_NOTEBOOKS)
    for name in DEMO_NOTEBOOKS:
        assert _errors(demo / "executed" / f"{name}.ipynb") == [], name

    imported = _record(demo / "executed" / "01_import_contacts.ipynb")
    assert imported["added"] == len(mailkit.load_contacts(demo_db)) and imported["rejected"]
    segment = _record(demo / "executed" / "02_build_segment.ipynb")
    # The two addresses the sink refused are suppressed now, so they left the segment.
    assert segment["members"] - 2 == mailkit.count_segment(demo_db, segment["segment"]) > 0

    composed = _record(demo / "executed" / "03_compose_and_preview.ipynb")
    assert composed["status"] == "draft" and composed["snapshot_hash"] is None

    sent = _record(demo / "executed" / "04_dispatch.ipynb")
    campaign = mailkit.load_campaign(demo_db, sent["campaign_id"])
    assert sent["campaign_id"] == composed["campaign_id"]
    assert sent["status"] == campaign.status == "finished"
    assert sent["snapshot_hash"] == campaign.snapshot_hash and len(sent["snapshot_hash"]) == 64
    assert sent["template"] == "spring-sale" and sent["template_version"] == 1
    report = mailkit.build_report(demo_db, campaign.id)
    assert sent["recipients"] == report.recipients == segment["members"]
    assert (sent["sent"], sent["bounced"]) == (report.sent, report.bounced) == (report.sent, 2)
    assert sent["ledger"] == mailkit.count_states(demo_db, campaign.id)
    maildir = list((demo / "maildir" / "new").iterdir())

    scheduled = _record(demo / "executed" / "scheduled_campaign.ipynb")
    assert scheduled["status"] == "finished" and scheduled["campaign_id"] != campaign.id
    assert len(maildir) == report.accepted + scheduled["ledger"]["sent"]


def test_dashboard_is_written_as_html_and_shown_in_the_notebook(demo: Path) -> None:
    dashboard = _record(demo / "executed" / "05_dashboard.ipynb")
    assert dashboard["campaign"] == "春のセール"
    page = (demo / "dashboard.html").read_text(encoding="utf-8")
    assert "plotly" in page.lower() and '"accepted"' in page
    data = page.split("Plotly.newPlot(", 1)[1].split(",", 1)[1].lstrip()
    traces, _ = json.JSONDecoder().raw_decode(data)
    assert traces[0]["x"][:3] == ["accepted", "rejected", "bounced"]
    assert traces[0]["y"][:3] == [dashboard["ledger"]["sent"], 2, 2]


def test_a_failing_cell_fails_the_run_with_its_error(demo: Path, tmp_path: Path) -> None:
    shutil.copy(demo / "mailkit.db", tmp_path / "mailkit.db")
    output = tmp_path / "out.ipynb"
    with pytest.raises(PapermillExecutionError) as failure:
        execute_notebook(
            "02_build_segment",
            output,
            {"db_url": f"sqlite:///{tmp_path / 'mailkit.db'}", "segment": "age >= 30 and"},
        )
    assert failure.value.ename == "SegmentError"
    assert "age >= 30 and" in failure.value.evalue
    assert any(e.startswith("SegmentError") for e in _errors(output))


def test_no_secret_from_the_environment_reaches_an_output_notebook(
    demo: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    shutil.copy(demo / "mailkit.db", tmp_path / "mailkit.db")
    params = {
        "db_url": f"sqlite:///{tmp_path / 'mailkit.db'}",
        "campaign_name": "秘密のテスト",
        "template_name": "spring-sale",
        "segment": "prefecture == '北海道'",
        "from_addr": "news@shop.example.jp",
    }
    with Sink(auth=("mk", SECRET)) as sink:
        # 1: the whole URL, password included, from the environment.
        monkeypatch.setenv("MAILKIT_SMTP_URL", f"smtp://mk:{SECRET}@127.0.0.1:{sink.port}")
        first = execute_notebook("scheduled_campaign", tmp_path / "first.ipynb", params)
        delivered = sink.count
        # 2: user and password apart; the URL parameter carries neither. Nothing is due again.
        monkeypatch.delenv("MAILKIT_SMTP_URL")
        monkeypatch.setenv("MAILKIT_SMTP_USER", "mk")
        monkeypatch.setenv("MAILKIT_SMTP_PASSWORD", SECRET)
        second = execute_notebook(
            "scheduled_campaign",
            tmp_path / "second.ipynb",
            {**params, "smtp_url": f"smtp://127.0.0.1:{sink.port}"},
        )
        assert sink.count == delivered  # the second run found the finished campaign
    db = mailkit.open_db(params["db_url"])
    with db.connect() as conn:
        campaign_id = conn.execute(
            select(campaigns.c.id).where(campaigns.c.name == "秘密のテスト")
        ).scalar_one()
    expected = mailkit.count_states(db, campaign_id)["sent"]
    db.dispose()
    assert delivered == expected > 0  # the password was needed, and it worked
    for output in (first, second):
        assert SECRET not in output.read_text(encoding="utf-8")
        assert _record(output)["ledger"]["sent"] == expected


def test_the_kernel_stays_responsive_while_a_campaign_sends(demo: Path, tmp_path: Path) -> None:
    from jupyter_client.manager import start_new_kernel

    from mailkit.demo_notebooks import ensure_kernel

    shutil.copy(demo / "mailkit.db", tmp_path / "mailkit.db")
    setup = f"""
import asyncio, mailkit
from mailkit import FaultPlan, Sink
from widgets import DispatchPanel
db = mailkit.open_db("sqlite:///{tmp_path / "mailkit.db"}")
campaign = mailkit.create_campaign(db, "応答性", template="spring-sale",
    segment="prefecture == '北海道'", from_addr="news@shop.example.jp")
stuck = mailkit.fetch_members(db, campaign.segment)["email"].iloc[3]
sink = Sink(faults=FaultPlan(stall_at_rcpt={{stuck}})).start()
panel = DispatchPanel(db, campaign.id, sink.url + "?timeout=3", concurrency=1, poll_interval=0.01,
    paced=False)
task = panel.start()
print("started", task is not None)
"""
    # This cell runs while the send is stuck mid-transaction: the kernel is not blocked by it.
    probe = """
for _ in range(2000):
    if sink.stalled:
        break
    await asyncio.sleep(0.005)
print("probe", sink.stalled, task.done())
"""
    finish = """
panel.stop()
result = await task  # the stalled RCPT times out (deferred), then the pause is noticed
sink.stop()
states = mailkit.count_states(db, campaign.id)
print("stopped", result.status, states["sent"] == sink.count, states["sending"])
"""
    manager, client = start_new_kernel(kernel_name=ensure_kernel())
    printed: list[str] = []

    def collect(message: dict[str, Any]) -> None:
        if message["msg_type"] == "stream":
            printed.append(message["content"]["text"].strip())
        if message["msg_type"] == "error":
            printed.append(f"error {message['content']['ename']}: {message['content']['evalue']}")

    try:
        for code in (setup, probe, finish):
            reply = client.execute_interactive(code, timeout=60, output_hook=collect)
            assert reply["content"]["status"] == "ok", printed
    finally:
        client.stop_channels()
        manager.shutdown_kernel(now=True)
    assert printed == ["started True", "probe 1 False", "stopped paused True 0"]
