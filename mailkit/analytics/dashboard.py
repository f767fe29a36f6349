"""The campaign dashboard: every frame and figure of one campaign, and its offline HTML page.

``load_dashboard`` queries the database once per frame; ``render_dashboard_html`` turns the
result into one self-contained HTML page (plotly.js embedded once, no network needed) that also
shows the metric definitions; ``save_dashboard_html`` does both and writes the file. In
JupyterLab, display ``dashboard.figures[name]`` directly.
"""

from __future__ import annotations

import html
import math
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import pandas as pd
import plotly.graph_objects as go
from sqlalchemy import Engine, func, select

from ..campaigns import load_campaign
from ..storage.schema import campaigns, messages, utcnow
from ..variants import load_variants
from .abtest import VariantComparison, build_variant_comparison, load_ab_metric
from .attributes import load_attribute_sizes
from .breakdowns import Unit, _add_click_rate, _load_link_counts, _order_variants
from .cube import load_metric_cube, summarise_cube
from .figures import (
    build_funnel_figure,
    build_kpi_figure,
    build_link_table,
    build_rate_figure,
    build_timeline_figure,
    build_trend_figure,
    build_variant_figure,
)
from .metrics import (
    COUNT_COLUMNS,
    METRIC_DEFINITIONS,
    RATE_COLUMNS,
    fetch_metric_frame,
    load_campaign_metrics,
)
from .reading import connect_analytics, open_reader_pool
from .timeline import _add_timeline_rates, _load_timeline_counts

__all__ = ["Dashboard", "load_dashboard", "render_dashboard_html", "save_dashboard_html"]

_PREFERRED_ATTRIBUTES = ("prefecture", "gender", "age_group", "segment")
_MAX_GROUPS = 50
_DIMENSIONS = ("domain", "variant")  # the cube's own; attributes of these names are skipped


@dataclass(frozen=True)
class Dashboard:
    """A campaign's frames (by name) and the figures drawn from them, in page order."""

    campaign_id: int
    title: str
    status: str
    notes: tuple[str, ...]
    frames: dict[str, pd.DataFrame] = field(default_factory=dict)
    figures: dict[str, go.Figure] = field(default_factory=dict)
    comparison: VariantComparison | None = None
    generated_at: datetime = field(default_factory=utcnow)


def _default_attributes(db: Engine, campaign_id: int, limit: int = 3) -> list[str]:
    """Attributes of the recipients with few enough distinct values to chart, best known first."""
    sizes = load_attribute_sizes(db, campaign_id, _MAX_GROUPS + 1)
    usable = [k for k, n in sizes.items() if 1 < n <= _MAX_GROUPS and k not in _DIMENSIONS]
    usable.sort(
        key=lambda k: (_PREFERRED_ATTRIBUTES.index(k) if k in _PREFERRED_ATTRIBUTES else 99, k)
    )
    return usable[:limit]


def _recent_campaigns(db: Engine, campaign_id: int, recent: int) -> list[int]:
    c = campaigns.c
    with connect_analytics(db) as conn:
        latest = conn.execute(
            select(c.id)
            .order_by(func.coalesce(c.started_at, c.created_at).desc(), c.id.desc())
            .limit(recent)
        ).scalars()
        return sorted({campaign_id, *latest})


def load_dashboard(
    db: Engine,
    campaign_id: int,
    *,
    attributes: list[str] | None = None,
    unit: Unit = "hour",
    ab_metric: str | None = None,
    recent: int = 24,
) -> Dashboard:
    """Load every frame of the campaign's dashboard and build its figures.

    ``attributes``: contact attributes to break the rates down by (default: up to three with
    at most 50 values among the recipients, prefecture and gender first); ``unit``: ``hour``
    or ``day`` for the timeline; ``ab_metric``: the A/B comparison's metric (default: the one
    saved with the test, else clicks); ``recent``: how many of the latest campaigns the
    cross-campaign trend shows (this one always among them).
    """
    campaign = load_campaign(db, campaign_id)
    keys = attributes if attributes is not None else _default_attributes(db, campaign_id)
    variants = [v.name for v in load_variants(db, campaign_id)]
    metric = load_ab_metric(db, campaign_id, ab_metric) if variants else None
    shown = _recent_campaigns(db, campaign_id, recent)
    others = [i for i in shown if i != campaign_id]
    # The queries are independent reads (snapshots that take no write lock, see ``reading``):
    # run them side by side. The totals and every breakdown come from one pass over the
    # recipients and their engagement summary (see ``cube``).
    with open_reader_pool(db, 4) as pool:
        cube_job = pool.submit(load_metric_cube, db, campaign_id, keys)
        timeline_job = pool.submit(_load_timeline_counts, db, campaign_id, unit)
        links_job = pool.submit(_load_link_counts, db, campaign_id)
        others_job = (
            pool.submit(fetch_metric_frame, db, others, messages.c.campaign_id, name="campaign_id")
            if others
            else None
        )
        cube = cube_job.result()
        metrics = summarise_cube(cube).set_axis(pd.Index([campaign_id], name="campaign_id"))
        delivered = int(metrics["delivered"].iloc[0])
        frames: dict[str, pd.DataFrame] = {"metrics": metrics}
        frames["timeline"] = _add_timeline_rates(timeline_job.result(), delivered)
        frames["domains"] = summarise_cube(cube, "domain", top=15)
        for key in keys:
            frames[f"attribute:{key}"] = summarise_cube(cube, key, top=50)
        frames["links"] = _add_click_rate(links_job.result(), delivered)
        counted = metrics[list(COUNT_COLUMNS)]
        if others_job is not None:
            counted = pd.concat([others_job.result()[list(COUNT_COLUMNS)], counted])
    comparison = None
    if variants and metric is not None:
        by_variant = _order_variants(summarise_cube(cube, "variant"), variants)
        comparison = build_variant_comparison(campaign_id, by_variant, metric)
        frames["variants"] = comparison.table
    frames["campaigns"] = load_campaign_metrics(db, shown, counted=counted)

    figures: dict[str, go.Figure] = {
        "kpi": build_kpi_figure(metrics),
        "funnel": build_funnel_figure(metrics),
        "timeline": build_timeline_figure(frames["timeline"], unit=unit),
        "domains": build_rate_figure(frames["domains"], title="Rates by recipient domain"),
    }
    for name, frame in frames.items():
        if name.startswith("attribute:"):
            key = name.partition(":")[2]
            figures[name] = build_rate_figure(frame, title=f"Rates by {key}")
    figures["links"] = build_link_table(frames["links"])
    if comparison is not None:
        figures["variants"] = build_variant_figure(comparison, verdict=False)
    figures["campaigns"] = build_trend_figure(frames["campaigns"])

    note = metrics["note"].iloc[0] if len(metrics) else None
    notes = [str(note)] if isinstance(note, str) and note else []
    if comparison is not None:
        notes.extend(comparison.notes)
    return Dashboard(
        campaign_id=campaign_id,
        title=f"Campaign {campaign_id}: {campaign.name}",
        status=campaign.status,
        notes=tuple(notes),
        frames=frames,
        figures=figures,
        comparison=comparison,
    )


_CSS = """
body { font-family: "Noto Sans CJK JP", "Hiragino Sans", Meiryo, sans-serif; margin: 24px auto;
       max-width: 1300px; color: #222; }
h1 { font-size: 1.6em; margin-bottom: 0.2em; }
.meta { color: #666; margin-top: 0; }
.notes { background: #FFF4D6; border-left: 4px solid #E0A800; padding: 8px 14px; }
.figure { margin: 18px 0; border-top: 1px solid #eee; }
table.counts, table.defs { border-collapse: collapse; font-size: 0.92em; }
table.counts td, table.counts th, table.defs td, table.defs th {
  border: 1px solid #ddd; padding: 3px 8px; text-align: left; }
table.counts td.num { text-align: right; font-variant-numeric: tabular-nums; }
.verdict { background: #EEF4FA; padding: 8px 14px; border-left: 4px solid #4C78A8; }
"""

_AB_DEFINITIONS = (
    ("variant rate", "successes / delivered of the variant, with a Wilson score interval"),
    ("p-value", "two-sided pooled two-proportion z-test of each variant against the first "
     "(control); with k variants each is judged at α / (k − 1)"),
    ("minimum detectable effect", "the smallest increase over the control's rate these sample "
     "sizes detect with 80 % power at that α (Cohen's h)"),
)  # fmt: skip


def _counts_table(metrics: pd.DataFrame) -> str:
    if metrics.empty:
        return ""
    row = metrics.iloc[0]
    cells = []
    for column in (*COUNT_COLUMNS, *RATE_COLUMNS):
        value = row[column]
        shown = (
            "n/a"
            if pd.isna(value)
            else (f"{value:.2f} %" if column in RATE_COLUMNS else f"{int(value):,}")
        )
        cells.append(f"<tr><th>{column}</th><td class='num'>{shown}</td></tr>")
    return "<table class='counts'>" + "".join(cells) + "</table>"


def _comparison_html(comparison: VariantComparison) -> str:
    """The verdict, then the comparison's numbers so every figure can be checked."""

    def fmt(value: float, pattern: str) -> str:
        return "–" if math.isnan(value) else pattern.format(value)

    head = (
        "<tr><th>variant</th><th>delivered</th><th>successes</th><th>rate</th>"
        f"<th>{round((1 - comparison.alpha) * 100)} % interval</th><th>difference</th>"
        "<th>p-value</th><th>detectable</th></tr>"
    )
    rows = []
    for name, r in comparison.table.iterrows():
        rows.append(
            f"<tr><td>{html.escape(str(name))}</td><td class='num'>{int(r['delivered']):,}</td>"
            f"<td class='num'>{int(r['successes']):,}</td>"
            f"<td class='num'>{fmt(r['rate'], '{:.2f} %')}</td>"
            f"<td class='num'>{fmt(r['ci_low'], '{:.2f}')} – {fmt(r['ci_high'], '{:.2f} %')}</td>"
            f"<td class='num'>{fmt(r['diff'], '{:+.2f} pt')}</td>"
            f"<td class='num'>{fmt(r['p_value'], '{:.4f}')}</td>"
            f"<td class='num'>{fmt(r['mde'], '≥ {:.2f} pt')}</td></tr>"
        )
    return (
        f"<p class='verdict'>{html.escape(comparison.verdict)}</p>"
        f"<table class='counts'>{head}{''.join(rows)}</table>"
    )


def _definitions_table() -> str:
    rows = [*METRIC_DEFINITIONS.items(), *_AB_DEFINITIONS]
    body = "".join(
        f"<tr><th>{html.escape(name)}</th><td>{html.escape(text)}</td></tr>" for name, text in rows
    )
    return f"<table class='defs'>{body}</table>"


def render_dashboard_html(dashboard: Dashboard) -> str:
    """One self-contained HTML page: plotly.js inlined once, no external references."""
    parts: list[str] = []
    for i, (name, fig) in enumerate(dashboard.figures.items()):
        chart: str = fig.to_html(
            full_html=False,
            include_plotlyjs=i == 0,
            include_mathjax=False,
            config={"displaylogo": False, "responsive": True},
            div_id=f"fig-{name.replace(':', '-')}",
        )
        parts.append(f"<div class='figure' data-figure='{html.escape(name)}'>{chart}</div>")
        if name == "variants" and dashboard.comparison is not None:
            parts.append(_comparison_html(dashboard.comparison))
    notes = "".join(f"<p>{html.escape(n)}</p>" for n in dashboard.notes)
    generated = dashboard.generated_at.strftime("%Y-%m-%d %H:%M UTC")
    return f"""<!DOCTYPE html>
<html lang="ja">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{html.escape(dashboard.title)}</title>
<style>{_CSS}</style>
</head>
<body>
<h1>{html.escape(dashboard.title)}</h1>
<p class="meta">status: {html.escape(dashboard.status)} · generated {generated} by mailkit</p>
{f'<div class="notes">{notes}</div>' if notes else ""}
{"".join(parts)}
<h2>Counts</h2>
{_counts_table(dashboard.frames.get("metrics", pd.DataFrame()))}
<h2>Definitions</h2>
<p>Every figure on this page is counted per recipient (ledger row) with these definitions.</p>
{_definitions_table()}
</body>
</html>
"""


def save_dashboard_html(db: Engine, campaign_id: int, path: str | Path, **options: Any) -> Path:
    """Load the campaign's dashboard and write it to ``path`` as one offline HTML file."""
    target = Path(path)
    page = render_dashboard_html(load_dashboard(db, campaign_id, **options))
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(page, encoding="utf-8")
    return target
