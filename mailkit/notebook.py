"""Library helpers for notebooks and widgets: records of what a run did, previews, plans.

Everything an analyst sees in ``widgets/`` or in the executed ``notebooks/`` is computed here,
so that the widgets stay thin and a headless papermill run shows the same facts as a click in
JupyterLab. Nothing built here contains a password: SMTP servers are shown as
``security host:port`` and database URLs with the password masked, because executed notebooks
are kept, shared and committed.
"""

from __future__ import annotations

import html
import keyword
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal

import plotly.graph_objects as go
from sqlalchemy import Engine, select
from sqlalchemy.engine import make_url

from ._notebook_runs import (
    DispatchPlan,
    describe_smtp_target,
    ensure_campaign,
    find_campaign,
    load_dispatch_plan,
    parse_send_at,
    resolve_smtp_url,
    send_due_campaign,
    unpaced_rules,
)
from .analytics import CampaignReport, build_report
from .campaigns import load_campaign
from .dispatch import count_states
from .errors import SegmentError
from .messages import build_message, message_to_bytes
from .storage import connect_for_reading
from .storage.schema import templates, utcnow
from .templates import (
    PREVIEW_UNSUBSCRIBE_URL,
    Template,
    build_context,
    load_template,
    render_template,
)

__all__ = [
    "DELIVERY_BARS",
    "SEGMENT_OPERATORS",
    "DispatchPlan",
    "Preview",
    "RunRecord",
    "SegmentCondition",
    "build_delivery_figure",
    "build_preview",
    "build_segment_expression",
    "describe_smtp_target",
    "ensure_campaign",
    "find_campaign",
    "load_dispatch_plan",
    "load_run_record",
    "load_template_names",
    "parse_send_at",
    "redact_db_url",
    "render_sandboxed_iframe",
    "resolve_smtp_url",
    "send_due_campaign",
    "unpaced_rules",
]

#: Operators a SegmentBuilder row offers, as written in segment expressions.
SEGMENT_OPERATORS: tuple[str, ...] = ("==", "!=", "<", "<=", ">", ">=", "in", "not in")


# -- run records ------------------------------------------------------------------------------


@dataclass(frozen=True)
class RunRecord:
    """What a notebook run did to one campaign, for the executed notebook to keep.

    ``recipients`` is the ledger size (everyone the campaign was snapshotted for); ``ledger``
    counts its rows per state; ``sent``, ``bounced`` and ``deliverability`` are the delivery
    report's (deliverability = (1 − bounced / sent) × 100). ``snapshot_hash`` is the SHA-256 of
    the recipients' contact ids, so two runs can be shown to have had the same audience.
    No URL with credentials is ever part of a record.
    """

    campaign_id: int
    campaign: str
    status: str
    status_reason: str | None
    template: str
    template_version: int
    segment: str
    snapshot_hash: str | None
    recipients: int
    sent: int
    bounced: int
    deliverability: float | None
    ledger: Mapping[str, int]
    send_at: str | None
    recorded_at: str

    def to_dict(self) -> dict[str, Any]:
        """The record as plain JSON-ready data."""
        data = asdict(self)
        data["ledger"] = dict(self.ledger)
        return data

    def _repr_json_(self) -> dict[str, Any]:
        # IPython puts this in the output as application/json: machine-readable in the
        # executed notebook, which is how tests and later tooling read what a run did.
        return self.to_dict()

    def _repr_markdown_(self) -> str:
        rows = [f"| {key} | {value} |" for key, value in self.to_dict().items()]
        return "\n".join(["| run record | |", "|---|---|", *rows])


def load_run_record(db: Engine, campaign_id: int) -> RunRecord:
    """The run record of a campaign as it stands now in the database."""
    campaign = load_campaign(db, campaign_id)
    template = load_template(db, campaign.template_id)
    report = build_report(db, campaign_id)
    return RunRecord(
        campaign_id=campaign.id,
        campaign=campaign.name,
        status=campaign.status,
        status_reason=campaign.status_reason,
        template=template.name,
        template_version=campaign.template_version,
        segment=campaign.segment,
        snapshot_hash=campaign.snapshot_hash,
        recipients=report.recipients,
        sent=report.sent,
        bounced=report.bounced,
        deliverability=report.deliverability,
        ledger=count_states(db, campaign_id),
        send_at=campaign.send_at.isoformat() if campaign.send_at else None,
        recorded_at=utcnow().isoformat(timespec="seconds"),
    )


# -- secrets stay out of outputs --------------------------------------------------------------


def redact_db_url(url: str) -> str:
    """A database URL with its password masked, for display."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # not parseable: show nothing of it rather than risk a secret
        return "<database URL>"


# -- segments ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class SegmentCondition:
    """One row of a segment builder: ``field op value``.

    ``value`` is text as typed: a number reads as a number, anything else as a string; for
    ``in``/``not in`` it is a comma-separated list.
    """

    field: str
    op: str
    value: str


def _field_token(name: str) -> str:
    name = name.strip()
    if not name:
        raise SegmentError("a condition has no field: pick an attribute")
    if name.isidentifier() and not keyword.iskeyword(name):
        return name
    if "`" in name:
        raise SegmentError(f"field {name!r} contains a backtick and cannot be written")
    return f"`{name}`"


def _literal(text: str) -> str:
    text = text.strip()
    try:
        number = float(text)
    except ValueError:
        return repr(text)
    if text.lower() in ("nan", "inf", "-inf", "infinity", "-infinity", "+inf"):
        return repr(text)
    return str(int(number)) if number.is_integer() and "." not in text else repr(number)


def build_segment_expression(
    conditions: Sequence[SegmentCondition], *, join: Literal["and", "or"] = "and"
) -> str:
    """The segment expression for builder rows joined by ``and``/``or`` (``all`` if none)."""
    if join not in ("and", "or"):
        raise SegmentError(f"conditions are joined by 'and' or 'or', not {join!r}")
    parts: list[str] = []
    for condition in conditions:
        if condition.op not in SEGMENT_OPERATORS:
            raise SegmentError(f"unknown operator {condition.op!r}; use one of {SEGMENT_OPERATORS}")
        field = _field_token(condition.field)
        if condition.op in ("in", "not in"):
            items = [item for item in condition.value.split(",") if item.strip()]
            if not items:
                raise SegmentError(f"{field} {condition.op} needs a comma-separated list")
            value = "[" + ", ".join(_literal(item) for item in items) + "]"
        else:
            value = _literal(condition.value)
        parts.append(f"{field} {condition.op} {value}")
    if not parts:
        return "all"
    if len(parts) == 1:
        return parts[0]
    return f" {join} ".join(f"({part})" if join == "or" else part for part in parts)


# -- templates --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Preview:
    """One recipient's message as it would be sent: subject, parts and the raw header block."""

    to: str
    subject: str
    html: str
    text: str
    headers: str


def load_template_names(db: Engine) -> list[str]:
    """Names of the stored templates, sorted."""
    with connect_for_reading(db) as conn:
        return sorted(conn.execute(select(templates.c.name)).scalars())


def build_preview(
    template: Template,
    contact: Mapping[str, Any],
    *,
    from_addr: str,
    reply_to: str | None = None,
) -> Preview:
    """Render ``template`` for ``contact`` and build the message the campaign would send.

    Raises TemplateError when this contact cannot be rendered and AddressError for bad
    addresses, as sending would.
    """
    rendered = render_template(
        template, build_context(contact, unsubscribe_url=PREVIEW_UNSUBSCRIBE_URL)
    )
    to_addr = str(contact.get("email") or "")
    raw_name = contact.get("name")
    name = raw_name if isinstance(raw_name, str) and raw_name else None
    message = build_message(
        rendered, from_addr=from_addr, to_addr=to_addr, to_name=name, reply_to=reply_to
    )
    head, _, _ = message_to_bytes(message).partition(b"\r\n\r\n")
    return Preview(
        to=to_addr,
        subject=rendered.subject,
        html=rendered.html,
        text=rendered.text,
        headers=head.decode("ascii", "replace").replace("\r\n", "\n"),
    )


def render_sandboxed_iframe(body: str, *, height: int = 420) -> str:
    """An ``<iframe sandbox srcdoc=...>`` showing ``body``: no scripts, forms or navigation.

    The HTML is escaped for the attribute, so the email cannot break out of the iframe.
    """
    return (
        f'<iframe sandbox="" srcdoc="{html.escape(body, quote=True)}" '
        f'style="width:100%;height:{int(height)}px;border:1px solid #ccc;background:#fff">'
        "</iframe>"
    )


# -- dashboard --------------------------------------------------------------------------------

#: Bars of the delivery figure, in order: CampaignReport attributes.
DELIVERY_BARS: tuple[str, ...] = (
    "accepted",
    "rejected",
    "bounced",
    "deferred",
    "pending",
    "unknown",
)


def build_delivery_figure(report: CampaignReport) -> go.Figure:
    """A bar chart of a campaign's delivery report, titled with its deliverability.

    The bars are the report's ``accepted``, ``rejected``, ``bounced``, ``deferred``,
    ``pending`` (queued + sending + deferred) and ``unknown`` counts, as defined in
    ``mailkit.analytics.report``; deliverability (到達率) = (1 − bounced / sent) × 100.
    This is the seam where the analytics figure builders plug in.
    """
    values = [int(getattr(report, bar)) for bar in DELIVERY_BARS]
    rate = "–" if report.deliverability is None else f"{report.deliverability:.2f} %"
    figure = go.Figure(
        data=[go.Bar(x=list(DELIVERY_BARS), y=values, text=values, name="messages")],
        layout={
            "title": {"text": f"{report.name} (#{report.campaign_id}): 到達率 {rate}"},
            "yaxis": {"title": {"text": "messages"}},
            "template": "plotly_white",
            "height": 380,
        },
    )
    return figure
