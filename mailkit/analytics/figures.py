"""Plotly figures built from the metric frames (pure: a frame in, a ``go.Figure`` out).

Every builder accepts the frame its ``load_*`` function returns and copes with an empty frame
or undefined rates by drawing a note instead of failing. The figures display in JupyterLab as
they are, and ``dashboard`` puts them in one offline HTML file.
"""

from __future__ import annotations

import math
from typing import Any

import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from .abtest import VariantComparison

__all__ = [
    "build_funnel_figure",
    "build_kpi_figure",
    "build_link_table",
    "build_rate_figure",
    "build_timeline_figure",
    "build_trend_figure",
    "build_variant_figure",
]

_KPIS = (
    ("deliverability", "到達率 deliverability"),
    ("open_rate", "open rate (human)"),
    ("click_rate", "click rate"),
    ("click_to_open_rate", "click-to-open"),
    ("unsubscribe_rate", "unsubscribe rate"),
    ("complaint_rate", "complaint rate"),
)
_COLORS = {"open_rate": "#4C78A8", "click_rate": "#F58518", "deliverability": "#54A24B"}
_FIRST_PERIODS = 72
_LAYOUT: dict[str, Any] = {
    "template": "plotly_white",
    "margin": {"l": 60, "r": 30, "t": 60, "b": 50},
    "font": {"family": "Noto Sans CJK JP, Hiragino Sans, Meiryo, sans-serif"},
}


def _note_figure(title: str, note: str, height: int = 260) -> go.Figure:
    fig = go.Figure()
    fig.add_annotation(
        text=note, x=0.5, y=0.5, xref="paper", yref="paper", showarrow=False, font={"size": 15}
    )
    fig.update_xaxes(visible=False)
    fig.update_yaxes(visible=False)
    fig.update_layout(title=title, height=height, **_LAYOUT)
    return fig


def _values(values: Any) -> list[Any]:
    """Plain JSON lists (NaN as null), so the page's data stays readable and greppable."""
    return [None if pd.isna(v) else (v.item() if hasattr(v, "item") else v) for v in values]


def _number(value: Any) -> float | None:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    return float(value)


def build_kpi_figure(metrics: pd.DataFrame, *, title: str = "Key figures") -> go.Figure:
    """Indicators of the headline rates (percent) from a ``load_metrics`` row.

    An undefined rate shows as a dash, with the frame's note in the subtitle.
    """
    if metrics.empty:
        return _note_figure(title, "no data")
    row = metrics.iloc[0]
    fig = make_subplots(rows=1, cols=len(_KPIS), specs=[[{"type": "indicator"}] * len(_KPIS)])
    for i, (column, label) in enumerate(_KPIS, start=1):
        # An undefined rate (value None) shows as a dash; the note says why.
        indicator = go.Indicator(
            mode="number",
            value=_number(row[column]),
            number={"suffix": " %", "valueformat": ".1f"},
            title={"text": label},
        )
        fig.add_trace(indicator, row=1, col=i)
    counts = (
        f"{int(row['recipients']):,} recipients · {int(row['sent']):,} sent · "
        f"{int(row['delivered']):,} delivered · {int(row['openers']):,} opened "
        f"(+{int(row['machine_openers']):,} machine only) · {int(row['clickers']):,} clicked"
    )
    note = row.get("note")
    noted = isinstance(note, str) and bool(note)
    subtitle = counts + (f"<br><b>note:</b> {note}" if noted else "")
    fig.update_layout(
        title={"text": f"{title}<br><sup>{subtitle}</sup>"},
        height=290 if noted else 260,
        **{**_LAYOUT, "margin": {**_LAYOUT["margin"], "t": 120 if noted else 90}},
    )
    return fig


def build_funnel_figure(metrics: pd.DataFrame, *, title: str = "Funnel") -> go.Figure:
    """The funnel sent → delivered → opened (human) → clicked, from a ``load_metrics`` row."""
    if metrics.empty or int(metrics.iloc[0]["sent"]) == 0:
        return _note_figure(title, "nothing sent yet: no funnel to draw")
    row = metrics.iloc[0]
    stages = ["sent", "delivered", "openers", "clickers"]
    fig = go.Figure(
        go.Funnel(
            y=["sent", "delivered", "opened (human)", "clicked"],
            x=[int(row[s]) for s in stages],
            textinfo="value+percent initial",
            marker={"color": ["#9D9D9D", "#54A24B", "#4C78A8", "#F58518"]},
        )
    )
    fig.update_layout(title=title, height=320, **_LAYOUT)
    return fig


def build_timeline_figure(
    timeline: pd.DataFrame, *, unit: str = "hour", title: str = "Opens and clicks over time"
) -> go.Figure:
    """Events per period since sending (stacked bars) and the cumulative rates (lines, right
    axis); a long timeline opens on its first 72 periods."""
    if timeline.empty:
        return _note_figure(title, "no opens or clicks recorded yet")
    xs = _values(timeline.index)
    fig = make_subplots(specs=[[{"secondary_y": True}]])
    for column, name, color in (
        ("opens", "opens (human)", "#4C78A8"),
        ("machine_opens", "opens (machine)", "#BAB0AC"),
        ("clicks", "clicks (human)", "#F58518"),
    ):
        fig.add_trace(go.Bar(x=xs, y=_values(timeline[column]), name=name, marker_color=color))
    for column, name, color in (
        ("open_rate", "cumulative open rate", "#1F4E79"),
        ("click_rate", "cumulative click rate", "#B3590A"),
    ):
        fig.add_trace(
            go.Scatter(
                x=xs, y=_values(timeline[column]), name=name, mode="lines", line={"color": color}
            ),
            secondary_y=True,
        )
    fig.update_xaxes(title_text=f"{unit}s since sending started")
    if len(xs) > _FIRST_PERIODS:
        # Engagement is front-loaded: open on the first periods; the rest is a pan away.
        fig.update_xaxes(range=[-0.5, _FIRST_PERIODS - 0.5])
        title = f"{title} (first {_FIRST_PERIODS} {unit}s of {len(xs)} shown: drag to pan)"
    fig.update_yaxes(title_text="events", secondary_y=False)
    fig.update_yaxes(title_text="% of delivered", secondary_y=True, rangemode="tozero")
    human = (timeline["opens"] + timeline["clicks"]).max()
    machine = timeline["machine_opens"].max()
    if human > 0 and machine > 3 * human:
        # Proxies open everything at once; unclipped, that spike flattens the human bars.
        fig.update_yaxes(range=[0, human * 1.3], secondary_y=False)
        fig.add_annotation(
            text=f"machine opens clipped (peak {int(machine):,} in one {unit})",
            x=0,
            y=1.02,
            xref="paper",
            yref="paper",
            xanchor="left",
            yanchor="bottom",
            showarrow=False,
            font={"color": "#7F7F7F"},
        )
    fig.update_layout(title=title, barmode="stack", height=380, **_LAYOUT)
    return fig


def build_rate_figure(
    breakdown: pd.DataFrame,
    *,
    title: str,
    rates: tuple[str, ...] = ("open_rate", "click_rate"),
) -> go.Figure:
    """Grouped bars of rates per group of a breakdown frame (domain, attribute, segment ...).

    Each bar is labelled with its rate; hovering shows the group's recipients and delivered
    counts. A group whose rate is undefined (nothing delivered) is labelled n/a, with no bar.
    """
    if breakdown.empty:
        return _note_figure(title, "no recipients in any group")
    if breakdown[list(rates)].isna().all().all():
        return _note_figure(title, "nothing delivered yet: the rates are undefined")
    groups = [str(g) for g in breakdown.index]
    fig = go.Figure()
    for rate in rates:
        fig.add_trace(
            go.Bar(
                x=groups,
                y=_values(breakdown[rate]),
                name=rate.replace("_", " "),
                marker_color=_COLORS.get(rate),
                text=["n/a" if pd.isna(v) else f"{v:.1f}" for v in breakdown[rate]],
                textposition="outside",
                customdata=breakdown[["recipients", "delivered"]].to_numpy().tolist(),
                hovertemplate="%{x}<br>%{y:.1f} %<br>recipients %{customdata[0]}"
                "<br>delivered %{customdata[1]}<extra>" + rate + "</extra>",
            )
        )
    fig.update_yaxes(title_text="%", rangemode="tozero")
    fig.update_xaxes(title_text=str(breakdown.index.name or ""))
    fig.update_layout(title=title, barmode="group", height=360, **_LAYOUT)
    return fig


def build_link_table(link_metrics: pd.DataFrame, *, title: str = "Links") -> go.Figure:
    """A table of tracked links: position, URL, clicks, clickers, scanner clicks, shares."""
    if link_metrics.empty:
        return _note_figure(title, "no tracked links in this campaign", height=200)
    frame = link_metrics.reset_index()

    def pct(series: pd.Series) -> list[str]:
        return ["n/a" if pd.isna(v) else f"{v:.1f} %" for v in series]

    fig = go.Figure(
        go.Table(
            columnwidth=[40, 360, 70, 70, 90, 90, 80],
            header={
                "values": [
                    "#",
                    "URL",
                    "clicks",
                    "clickers",
                    "scanner clicks",
                    "share of clicks",
                    "click rate",
                ],
                "fill_color": "#E8EEF4",
                "align": "left",
            },
            cells={
                "values": [
                    _values(frame["position"]),
                    _values(frame["url"]),
                    _values(frame["clicks"]),
                    _values(frame["clickers"]),
                    _values(frame["machine_clicks"]),
                    pct(frame["click_share"]),
                    pct(frame["click_rate"]),
                ],
                "align": "left",
            },
        )
    )
    fig.update_layout(title=title, height=150 + 26 * len(frame), **_LAYOUT)
    return fig


def build_variant_figure(comparison: VariantComparison, *, verdict: bool = True) -> go.Figure:
    """Each variant's rate with its Wilson interval as error bars; the verdict underneath
    (``verdict=False`` leaves it out, for pages that print it as text)."""
    title = f"A/B test: {comparison.label} by variant"
    table = comparison.table
    if table.empty:
        return _note_figure(title, "this campaign has no variants")
    fig = go.Figure(
        go.Bar(
            x=[str(v) for v in table.index],
            y=_values(table["rate"]),
            error_y={
                "type": "data",
                "symmetric": False,
                "array": _values(table["ci_high"] - table["rate"]),
                "arrayminus": _values(table["rate"] - table["ci_low"]),
            },
            customdata=table[["successes", "delivered"]].to_numpy().tolist(),
            hovertemplate="%{x}: %{y:.2f} %<br>%{customdata[0]} of %{customdata[1]} delivered"
            "<extra></extra>",
            marker_color="#4C78A8",
        )
    )
    confidence = round((1 - comparison.alpha) * 100)
    fig.update_yaxes(title_text=f"% of delivered ({confidence} % Wilson interval)")
    fig.update_layout(title=title, height=420 if verdict else 340, **_LAYOUT)
    if verdict:
        fig.update_layout(margin={**_LAYOUT["margin"], "b": 130})
        fig.add_annotation(
            text="<br>".join(_wrap(comparison.verdict, 130)),
            x=0,
            y=-0.18,
            xref="paper",
            yref="paper",
            showarrow=False,
            align="left",
            xanchor="left",
            yanchor="top",
        )
    return fig


def _wrap(text: str, width: int) -> list[str]:
    lines: list[str] = []
    current = ""
    for word in text.split(" "):
        if current and len(current) + 1 + len(word) > width:
            lines.append(current)
            current = word
        else:
            current = f"{current} {word}" if current else word
    return [*lines, current] if current else lines


def build_trend_figure(
    campaign_metrics: pd.DataFrame, *, title: str = "Across campaigns"
) -> go.Figure:
    """Rates of each campaign in order of sending, from ``load_campaign_metrics``."""
    frame = campaign_metrics[campaign_metrics["sent"] > 0] if len(campaign_metrics) else None
    if frame is None or frame.empty:
        return _note_figure(title, "no campaign has sent anything yet")
    labels = [f"{cid}: {name}" for cid, name in zip(frame.index, frame["name"], strict=True)]
    fig = go.Figure()
    for rate in ("deliverability", "open_rate", "click_rate"):
        fig.add_trace(
            go.Scatter(
                x=labels,
                y=_values(frame[rate]),
                name=rate.replace("_", " "),
                mode="lines+markers",
                line={"color": _COLORS[rate]},
                customdata=frame[["started_at"]].astype(str).to_numpy().tolist(),
                hovertemplate="%{x}<br>%{y:.1f} %<br>started %{customdata[0]}<extra></extra>",
            )
        )
    fig.update_yaxes(title_text="%", rangemode="tozero")
    fig.update_xaxes(title_text="campaign (in order of sending)")
    fig.update_layout(title=title, height=360, **_LAYOUT)
    return fig
