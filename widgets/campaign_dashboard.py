"""CampaignDashboard: pick a campaign; its Plotly figure updates in place.

The figure is one ``plotly.graph_objects.FigureWidget`` for the widget's whole life: picking
another campaign or refreshing replaces its data inside ``batch_update``, so the notebook
output is not redrawn. The figure itself comes from ``mailkit.notebook.build_delivery_figure``,
the one seam where richer analytics figures plug in.
"""

from __future__ import annotations

import html
from typing import Any

import ipywidgets as w
import plotly.graph_objects as go
from sqlalchemy import Engine

from mailkit import CampaignReport, MailkitError, build_report, load_campaigns
from mailkit.notebook import build_delivery_figure

from ._common import show_error

__all__ = ["CampaignDashboard"]


class CampaignDashboard(w.VBox):  # type: ignore[misc]
    """A campaign picker, a refresh button, the delivery figure and the report table."""

    def __init__(self, db: Engine, campaign_id: int | None = None) -> None:
        self.db = db
        self.report: CampaignReport | None = None
        self.error: str | None = None
        self.picker = w.Dropdown(options=[], description="campaign")
        self.refresh_button = w.Button(description="Refresh", icon="refresh")
        self.figure = go.FigureWidget()
        self.summary_html = w.HTML()
        self.error_html = w.HTML()
        self.picker.observe(self._picked, names="value")
        self.refresh_button.on_click(lambda _b: self.refresh())
        super().__init__(
            [
                w.HBox([self.picker, self.refresh_button]),
                self.figure,
                self.summary_html,
                self.error_html,
            ]
        )
        self.load_campaign_choices()
        if campaign_id is None and self.picker.options:
            campaign_id = self.picker.options[0][1]  # the newest
        if campaign_id is not None:
            self.select(campaign_id)
        else:
            self.refresh()

    def load_campaign_choices(self) -> None:
        """Reload the campaigns offered by the picker (newest first)."""
        frame = load_campaigns(self.db)
        self.picker.options = [
            (f"#{row['id']} {row['name']} ({row['status']})", int(row["id"]))
            for row in frame.to_dict("records")
        ]

    def select(self, campaign_id: int) -> None:
        """Show this campaign (reloading the choices if it is new)."""
        if campaign_id not in [value for _, value in self.picker.options]:
            self.load_campaign_choices()
        if self.picker.value == campaign_id:
            self.refresh()
        else:
            self.picker.value = campaign_id  # refreshes through the observer

    def refresh(self) -> None:
        """Rebuild the report of the picked campaign and update the figure in place."""
        self.error = None
        self.error_html.value = ""
        if self.picker.value is None:
            self.summary_html.value = "<i>no campaigns yet</i>"
            return
        try:
            self.report = build_report(self.db, int(self.picker.value))
        except MailkitError as exc:
            self.error = show_error(self.error_html, exc)
            return
        fresh = build_delivery_figure(self.report)
        with self.figure.batch_update():
            if len(self.figure.data) != len(fresh.data):
                self.figure.data = ()
                for trace in fresh.data:
                    self.figure.add_trace(trace)
            else:
                for mine, theirs in zip(self.figure.data, fresh.data, strict=True):
                    mine.update(theirs.to_plotly_json())
            self.figure.layout.update(fresh.layout.to_plotly_json())
        self.summary_html.value = _report_table(self.report)

    def _picked(self, _change: Any) -> None:
        self.refresh()


def _report_table(report: CampaignReport) -> str:
    cells = "".join(
        f"<tr><th style='text-align:left;padding-right:1em'>{html.escape(str(key))}</th>"
        f"<td>{html.escape(str(value))}</td></tr>"
        for key, value in report.to_dict().items()
    )
    return f"<table>{cells}</table>"
