"""Analytics: metric queries returning pandas DataFrames (and, later, Plotly figures)."""

from .report import CampaignReport, build_report, load_report_frame

__all__ = ["CampaignReport", "build_report", "load_report_frame"]
