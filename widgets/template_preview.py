"""TemplatePreview: one recipient's message as it would be sent, and the segment's preflight.

Pick a template and a contact from a sample of the segment (or step through it) to see the
subject, the HTML in a sandboxed iframe (no scripts, no navigation), the text part and the raw
headers. "Preflight" renders the template for every member and lists who would fail and why.
"""

from __future__ import annotations

import html
from typing import Any

import ipywidgets as w
import pandas as pd
from sqlalchemy import Engine

from mailkit import (
    MailkitError,
    PreflightReport,
    fetch_members,
    load_template,
    preflight_template,
)
from mailkit.notebook import (
    Preview,
    build_preview,
    load_template_names,
    render_sandboxed_iframe,
)

from ._common import layout, render_frame, show_error

__all__ = ["TemplatePreview"]

PREVIEW_FROM = "mailkit preview <preview@example.invalid>"


def _pre(text: str) -> str:
    return (
        '<pre style="white-space:pre-wrap;max-height:300px;overflow:auto;margin:0">'
        f"{html.escape(text)}</pre>"
    )


class TemplatePreview(w.VBox):  # type: ignore[misc]
    """Preview ``template`` for members of ``segment`` as sent from ``from_addr``."""

    def __init__(
        self,
        db: Engine,
        *,
        template: str | None = None,
        segment: str = "all",
        from_addr: str = PREVIEW_FROM,
        reply_to: str | None = None,
        sample_size: int = 20,
    ) -> None:
        self.db = db
        self.segment = segment
        self.from_addr = from_addr
        self.reply_to = reply_to
        self.preview: Preview | None = None
        self.preflight: PreflightReport | None = None
        self.error: str | None = None
        self.sample: pd.DataFrame = pd.DataFrame()
        names = load_template_names(db)
        self.template = w.Dropdown(
            options=names, value=template if template in names else (names[0] if names else None)
        )
        self.contact = w.Dropdown(options=[], layout=layout(width="60%"))
        self.previous_button = w.Button(description="◀", layout=layout(width="40px"))
        self.next_button = w.Button(description="▶", layout=layout(width="40px"))
        self.subject_html = w.HTML()
        self.html_part = w.HTML()
        self.text_part = w.HTML()
        self.headers_html = w.HTML()
        self.error_html = w.HTML()
        self.preflight_button = w.Button(description="Preflight the whole segment")
        self.preflight_html = w.HTML()
        self.tabs = w.Tab(children=[self.html_part, self.text_part, self.headers_html])
        for i, title in enumerate(("HTML", "text", "headers")):
            self.tabs.set_title(i, title)
        self.template.observe(self._changed, names="value")
        self.contact.observe(self._changed, names="value")
        self.previous_button.on_click(lambda _b: self.step(-1))
        self.next_button.on_click(lambda _b: self.step(+1))
        self.preflight_button.on_click(lambda _b: self.run_preflight())
        super().__init__(
            [
                w.HBox([self.template, self.previous_button, self.contact, self.next_button]),
                self.subject_html,
                self.error_html,
                self.tabs,
                self.preflight_button,
                self.preflight_html,
            ]
        )
        self.load_sample(sample_size)

    def load_sample(self, sample_size: int = 20) -> None:
        """Load the first ``sample_size`` members of the segment as the contact choices."""
        try:
            self.sample = fetch_members(self.db, self.segment, limit=sample_size)
        except MailkitError as exc:
            self.error = show_error(self.error_html, exc)
            return
        options = [
            (f"{row['name'] or ''} <{row['email']}>", i)
            for i, row in enumerate(self.sample.to_dict("records"))
        ]
        self.contact.options = options
        if options and self.contact.value is None:
            self.contact.value = 0  # renders through the observer
        else:
            self.render()

    def step(self, delta: int) -> None:
        """Show the previous (-1) or next (+1) contact of the sample, wrapping around."""
        if len(self.sample):
            self.contact.value = (int(self.contact.value or 0) + delta) % len(self.sample)

    def render(self) -> None:
        """Render the chosen template for the chosen contact; errors are shown inline."""
        self.error, self.preview = None, None
        self.error_html.value = ""
        if self.template.value is None:
            self.error_html.value = "<i>no templates stored yet: save_template(...) first</i>"
            return
        if self.contact.value is None or not len(self.sample):
            self.subject_html.value = "<i>no contact in the segment to preview with</i>"
            return
        contact: dict[str, Any] = {
            str(k): v for k, v in self.sample.iloc[int(self.contact.value)].to_dict().items()
        }
        try:
            template = load_template(self.db, str(self.template.value))
            self.preview = build_preview(
                template, contact, from_addr=self.from_addr, reply_to=self.reply_to
            )
        except MailkitError as exc:
            self.error = show_error(self.error_html, exc)
            for part in (self.subject_html, self.html_part, self.text_part, self.headers_html):
                part.value = ""
            return
        self.subject_html.value = f"<b>Subject</b> {html.escape(self.preview.subject)}"
        self.html_part.value = render_sandboxed_iframe(self.preview.html)
        self.text_part.value = _pre(self.preview.text)
        self.headers_html.value = _pre(self.preview.headers)

    def run_preflight(self) -> PreflightReport | None:
        """Render the template for every member of the segment; show who fails and why."""
        self.preflight = None
        try:
            template = load_template(self.db, str(self.template.value))
            members = fetch_members(self.db, self.segment)
            records = [{str(k): v for k, v in r.items()} for r in members.to_dict("records")]
            self.preflight = preflight_template(template, records)
        except MailkitError as exc:
            self.error = show_error(self.preflight_html, exc)
            return None
        report = self.preflight
        if report.ok:
            self.preflight_html.value = (
                f"<b>preflight</b> all {report.checked:,} recipients render ✓"
            )
        else:
            failures = pd.DataFrame(
                [(f.contact_id, f.email, f.error) for f in report.failures],
                columns=["contact_id", "email", "error"],
            )
            self.preflight_html.value = (
                f"<b>preflight</b> {len(report.failures):,} of {report.checked:,} recipients "
                "cannot be rendered; nothing would be sent:" + render_frame(failures, max_rows=50)
            )
        return report

    def _changed(self, _change: Any) -> None:
        self.render()
