"""The widgets, headless: set values and click as an analyst would, then check real effects."""

from __future__ import annotations

import asyncio
import html
import re
from collections.abc import Iterator

import pandas as pd
import pytest
from sqlalchemy import Engine

import mailkit
from mailkit import FaultPlan, SegmentError, Sink
from mailkit.notebook import SegmentCondition, build_segment_expression
from widgets import CampaignDashboard, DispatchPanel, SegmentBuilder, TemplatePreview

PEOPLE = [
    # email, name, prefecture, age, 部署
    ("sato@example.jp", "佐藤太郎", "東京都", "34", "営業"),
    ("suzuki@example.jp", "鈴木花子", "東京都", "28", "人事"),
    ("takahashi@example.co.jp", "高橋健太", "大阪府", "45", "営業"),
    ("tanaka@example.jp", "田中陽子", "東京都", "51", None),
    ("ito@example.jp", "伊藤翔", "神奈川県", "39", "開発"),
    ("watanabe@example.jp", "渡辺結衣", "東京都", "30", "開発"),
    ("yamamoto@example.jp", "山本蓮", "福岡県", "22", None),
    ("nakamura@example.jp", "中村さくら", "東京都", "63", "営業"),
]
SENDER = "ショップ <news@shop.example.jp>"


@pytest.fixture
def workspace(db: Engine) -> Engine:
    frame = pd.DataFrame(PEOPLE, columns=["email", "name", "prefecture", "age", "部署"])
    mailkit.import_contacts(db, frame, list_name="会員")
    mailkit.save_template(
        db,
        "spring",
        subject="{{ name }}様へ 春のご案内",
        html='<p>{{ name }} 様</p><p class="x">"{{ prefecture }}" の会員様へ</p>',
    )
    return db


def _campaign(db: Engine, segment: str = "prefecture == '東京都'") -> int:
    return mailkit.create_campaign(
        db, "春のセール", template="spring", segment=segment, from_addr=SENDER
    ).id


@pytest.fixture
def sink() -> Iterator[Sink]:
    with Sink() as server:
        yield server


# -- SegmentBuilder -----------------------------------------------------------------------


def test_segment_rows_produce_expression_count_and_sample(workspace: Engine) -> None:
    builder = SegmentBuilder(workspace)
    assert builder.expression == "all" and builder.count == len(PEOPLE)

    builder.add_condition("prefecture", "==", "東京都")
    age = builder.add_condition("age", ">=", "30")
    assert builder.expression == "prefecture == '東京都' and age >= 30"
    assert builder.count == 4 == mailkit.count_segment(workspace, builder.expression)
    assert set(builder.sample["email"]) == {
        "sato@example.jp",
        "tanaka@example.jp",
        "watanabe@example.jp",
        "nakamura@example.jp",
    }
    assert "prefecture == &#x27;東京都&#x27; and age &gt;= 30" in builder.produced.value
    assert "nakamura@example.jp" in builder.sample_html.value

    # Typing into a row's value box is live, as is switching and/or.
    age.value.value = "50"
    assert builder.count == 2
    builder.set_join("or")
    assert builder.expression == "(prefecture == '東京都') or (age >= 50)"
    assert builder.count == 5
    assert builder.segment.expression == builder.expression

    builder.remove_condition(age)
    builder.rows[0].op.value = "in"
    builder.rows[0].value.value = "大阪府, 福岡県"
    assert builder.expression == "prefecture in ['大阪府', '福岡県']"
    assert builder.count == 2


def test_segment_errors_are_inline_and_raised_to_code(workspace: Engine) -> None:
    builder = SegmentBuilder(workspace, expression="age >= 30 and")
    assert builder.error is not None and "SegmentError" in builder.error
    assert "SegmentError" in builder.error_html.value
    assert builder.count is None and builder.sample.empty
    with pytest.raises(SegmentError):
        _ = builder.segment

    builder.expression_text.value = "prefecture == '大阪府'"
    assert builder.error is None and builder.error_html.value == ""
    assert builder.count == 1

    builder.add_condition("no_such_field", "==", "x")  # back to rows mode
    assert builder.error is not None and "no_such_field" in builder.error


def test_segment_expression_builder_quotes_values_and_fields() -> None:
    rows = [
        SegmentCondition("age", ">=", "30"),
        SegmentCondition("score", "<", "2.5"),
        SegmentCondition("e-mail flag", "==", "y"),
        SegmentCondition("zip", "==", "0012"),
        SegmentCondition("name", "==", "O'Brien"),
    ]
    assert build_segment_expression(rows) == (
        "age >= 30 and score < 2.5 and `e-mail flag` == 'y' and zip == 12 and name == \"O'Brien\""
    )
    with pytest.raises(SegmentError):
        build_segment_expression([SegmentCondition("age", "=~", "3")])


# -- TemplatePreview ----------------------------------------------------------------------


def test_template_preview_renders_parts_in_a_sandboxed_iframe(workspace: Engine) -> None:
    preview = TemplatePreview(workspace, template="spring", segment="prefecture == '東京都'")
    shown = preview.preview
    assert shown is not None and shown.to == "sato@example.jp"
    assert shown.subject == "佐藤太郎様へ 春のご案内"
    assert "佐藤太郎様へ" in preview.subject_html.value
    frame = preview.html_part.value
    assert frame.startswith('<iframe sandbox="" srcdoc="')
    srcdoc = re.search(r'srcdoc="([^"]*)"', frame)
    assert srcdoc is not None and html.unescape(srcdoc.group(1)) == shown.html
    assert '"東京都"' in shown.html and "<p" not in srcdoc.group(1)
    assert "佐藤太郎 様" in preview.text_part.value
    assert "Subject: =?utf-8?" in shown.headers and "To: " in shown.headers
    assert "Message-ID: &lt;" in preview.headers_html.value

    preview.next_button.click()
    assert preview.preview is not None and preview.preview.to == "suzuki@example.jp"
    preview.previous_button.click()
    preview.previous_button.click()  # wraps around to the last of the sample
    assert preview.preview is not None and preview.preview.to == "nakamura@example.jp"


def test_template_preview_preflight_lists_who_fails(workspace: Engine) -> None:
    mailkit.save_template(
        workspace, "dept", subject="{{ 部署 }}のお知らせ", html="<p>{{ name }}</p>"
    )
    preview = TemplatePreview(workspace, template="dept", segment="prefecture == '東京都'")
    # The first member has a 部署; the third (田中) has none: inline error for that contact.
    assert preview.error is None
    preview.contact.value = 2
    assert preview.error is not None and "部署" in preview.error
    assert preview.preview is None and preview.subject_html.value == ""

    preview.preflight_button.click()
    report = preview.preflight
    assert report is not None and report.checked == 5
    assert [f.email for f in report.failures] == ["tanaka@example.jp"]
    assert "1 of 5 recipients" in preview.preflight_html.value
    assert "tanaka@example.jp" in preview.preflight_html.value

    preview.template.value = "spring"
    assert preview.run_preflight() is not None and preview.preflight_html.value.count("✓") == 1


# -- DispatchPanel ------------------------------------------------------------------------


def test_dispatch_panel_plan_test_send_confirmation_and_send(workspace: Engine, sink: Sink) -> None:
    mailkit.save_suppression(workspace, "suzuki@example.jp", reason="unsubscribe")
    campaign_id = _campaign(workspace)
    panel = DispatchPanel(workspace, campaign_id, sink.url, concurrency=2)
    plan = panel.plan
    assert plan is not None
    assert plan.recipients == 4  # five in Tokyo, one suppressed
    assert plan.from_addr == SENDER and plan.dkim is False and plan.schedule == "now"
    assert plan.smtp == f"none 127.0.0.1:{sink.port}"
    for shown in ("recipients (after suppression)</th><td>4", "DKIM</th><td>off", "now"):
        assert shown in panel.plan_html.value

    panel.test_address.value = "qa@shop.example.jp"
    panel.test_button.click()
    assert panel.test_outcome is not None and panel.test_outcome.kind == "sent"
    (test_message,) = sink.messages()
    assert test_message["To"].addresses[0].addr_spec == "qa@shop.example.jp"
    assert str(test_message["Subject"]).startswith("[TEST] ")
    assert sum(mailkit.count_states(workspace, campaign_id).values()) == 0
    assert mailkit.load_campaign(workspace, campaign_id).status == "draft"

    panel.send_button.click()
    assert panel.confirm_button.description == "Yes, send to 4 recipients"
    assert "to 4 recipients" in panel.confirm_html.value
    assert panel.confirm_box.layout.display == ""
    panel.confirm_button.click()  # no running loop here: sends to completion

    assert panel.result is not None and panel.result.status == "finished"
    received = sorted(r.rcpt_tos[0] for r in sink.envelopes()[1:])
    assert received == [
        "nakamura@example.jp",
        "sato@example.jp",
        "tanaka@example.jp",
        "watanabe@example.jp",
    ]
    assert panel.progress.value == panel.progress.max == 4
    assert "sent 4" in panel.counts_html.value
    assert "finished" in panel.status_html.value


def test_dispatch_panel_stop_pauses_and_resume_sends_the_rest(workspace: Engine) -> None:
    campaign_id = _campaign(workspace, segment="all")
    # One recipient's RCPT is never answered, so the send is provably mid-flight at Stop;
    # the client's command timeout then ends that transaction (deferred, never lost).
    stuck = "takahashi@example.co.jp"
    first = Sink(faults=FaultPlan(stall_at_rcpt={stuck})).start()
    url = f"{first.url}?timeout=3"
    panel = DispatchPanel(workspace, campaign_id, url, concurrency=1, poll_interval=0.01)

    async def send_then_stop() -> None:
        task = panel.start()
        assert task is not None and panel.stop_button.layout.display == ""
        for _ in range(2000):
            if first.stalled:
                break
            await asyncio.sleep(0.005)
        assert first.stalled == 1
        assert panel.stop() is True
        assert mailkit.load_campaign(workspace, campaign_id).status == "paused"
        result = await task
        assert result is not None and result.status == "paused"

    try:
        asyncio.run(send_then_stop())
    finally:
        first.stop()
    assert panel.stopped and panel.resume_button.layout.display == ""
    assert "paused" in panel.status_html.value
    states = mailkit.count_states(workspace, campaign_id)
    before = {r.rcpt_tos[0] for r in first.envelopes()}
    assert stuck not in before and len(before) == states["sent"]
    assert states["sending"] == 0 and states["deferred"] == 1
    assert states["queued"] == len(PEOPLE) - states["sent"] - 1 > 0

    with Sink() as second:
        panel._smtp_url = second.url
        panel.resume_button.click()  # no running loop here: resumes to completion
        resumed = {r.rcpt_tos[0] for r in second.envelopes()}
    # Everyone who was queued, nobody twice; the deferred one waits for its retry time.
    assert resumed == {p[0] for p in PEOPLE} - before - {stuck}
    states = mailkit.count_states(workspace, campaign_id)
    assert states["sent"] == len(PEOPLE) - 1 and states["deferred"] == 1
    assert panel.progress.value == len(PEOPLE) - 1 and panel.progress.max == len(PEOPLE)


def test_dispatch_panel_errors_show_inline_and_raise(workspace: Engine) -> None:
    campaign_id = _campaign(workspace)
    with Sink() as gone:
        url = gone.url  # a port that nothing listens on once the sink stopped
    panel = DispatchPanel(workspace, campaign_id, url)
    with pytest.raises(mailkit.SMTPDeliveryError):
        panel.send()
    assert panel.error is not None and "SMTPDeliveryError" in panel.error_html.value
    assert panel.send_button.disabled is False

    no_server = DispatchPanel(workspace, campaign_id, None)
    no_server._smtp_url = None
    assert no_server.send_test("qa@shop.example.jp") is None
    assert "MAILKIT_SMTP_URL" in no_server.test_html.value


def test_dispatch_panel_never_shows_the_password(workspace: Engine) -> None:
    campaign_id = _campaign(workspace)
    with Sink(auth=("mk", "s3cr3t-xyz")) as sink:
        url = sink.url.replace("smtp://", "smtp://mk:s3cr3t-xyz@")
        panel = DispatchPanel(workspace, campaign_id, url)
        panel.request_send()
        result = panel.send()
        assert result is not None and result.outcomes["sent"] == 5 and sink.count == 5
    shown = [child.value for child in _walk(panel) if hasattr(child, "value")]
    assert not any("s3cr3t" in str(value) for value in shown)


def _walk(widget: object) -> Iterator[object]:
    yield widget
    for child in getattr(widget, "children", ()):
        yield from _walk(child)


# -- CampaignDashboard --------------------------------------------------------------------


def test_dashboard_figure_updates_in_place(workspace: Engine) -> None:
    first = _campaign(workspace)
    second = mailkit.create_campaign(
        workspace, "大阪", template="spring", segment="prefecture == '大阪府'", from_addr=SENDER
    ).id
    dashboard = CampaignDashboard(workspace)
    figure = dashboard.figure
    assert dashboard.picker.value == second  # newest first
    assert list(figure.data[0].y) == [0, 0, 0, 0, 0, 0]

    refused = {"tanaka@example.jp": "550 5.1.1 <tanaka@example.jp>: user unknown"}
    with Sink(rcpt_replies=refused) as sink:
        mailkit.send_campaign(workspace, first, sink.url)
    dashboard.select(first)
    assert dashboard.figure is figure and len(figure.data) == 1
    bars = dict(zip(figure.data[0].x, figure.data[0].y, strict=True))
    assert bars == {
        "accepted": 4,
        "rejected": 1,
        "bounced": 1,
        "deferred": 0,
        "pending": 0,
        "unknown": 0,
    }
    assert "到達率 80.00 %" in figure.layout.title.text
    assert dashboard.report is not None and dashboard.report.deliverability == 80.0
    assert "deliverability" in dashboard.summary_html.value

    dashboard.picker.value = second
    assert list(figure.data[0].y) == [0, 0, 0, 0, 0, 0] and "大阪" in figure.layout.title.text
