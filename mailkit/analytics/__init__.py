"""Analytics: metric queries returning pandas DataFrames, A/B statistics, Plotly dashboards.

Counting happens in SQL (``metrics``); breakdowns slice the same counts (``breakdowns``);
``abtest`` compares variants; ``figures`` and ``dashboard`` draw them.
"""

from .abtest import (
    VariantComparison,
    build_comparison_table,
    build_variant_comparison,
    compare_variants,
    compute_minimum_detectable_effect,
    compute_two_proportion_ztest,
    compute_wilson_interval,
    load_ab_metric,
    render_verdict,
)
from .breakdowns import (
    CARRIER_DOMAINS,
    build_domain_group,
    load_link_metrics,
    load_metrics_by_attribute,
    load_metrics_by_domain,
    load_metrics_by_segment,
    load_metrics_by_variant,
    load_timeline,
)
from .cube import load_metric_cube, summarise_cube
from .dashboard import Dashboard, load_dashboard, render_dashboard_html, save_dashboard_html
from .events import EVENT_TYPES, record_events, save_event
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
    add_rates,
    fetch_metric_frame,
    load_campaign_metrics,
    load_metrics,
    select_metric_counts,
)
from .report import CampaignReport, build_report, load_report_frame

__all__ = [
    "CARRIER_DOMAINS",
    "COUNT_COLUMNS",
    "EVENT_TYPES",
    "METRIC_DEFINITIONS",
    "RATE_COLUMNS",
    "CampaignReport",
    "Dashboard",
    "VariantComparison",
    "add_rates",
    "build_comparison_table",
    "build_domain_group",
    "build_funnel_figure",
    "build_kpi_figure",
    "build_link_table",
    "build_rate_figure",
    "build_report",
    "build_timeline_figure",
    "build_trend_figure",
    "build_variant_comparison",
    "build_variant_figure",
    "compare_variants",
    "compute_minimum_detectable_effect",
    "compute_two_proportion_ztest",
    "compute_wilson_interval",
    "fetch_metric_frame",
    "load_ab_metric",
    "load_campaign_metrics",
    "load_dashboard",
    "load_link_metrics",
    "load_metric_cube",
    "load_metrics",
    "load_metrics_by_attribute",
    "load_metrics_by_domain",
    "load_metrics_by_segment",
    "load_metrics_by_variant",
    "load_report_frame",
    "load_timeline",
    "record_events",
    "render_dashboard_html",
    "render_verdict",
    "save_dashboard_html",
    "save_event",
    "select_metric_counts",
    "summarise_cube",
]
