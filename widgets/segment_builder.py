"""SegmentBuilder: build a segment from attribute / operator / value rows, or type it.

Every change recomputes the member count and a sample of members from the database and shows
the expression the rows produce. A bad row or expression shows its error inline (and keeps it
in ``.error``); ``.expression`` and ``.segment`` raise it to code that asks for the result.
"""

from __future__ import annotations

import html
from typing import Any, Literal

import ipywidgets as w
import pandas as pd
from sqlalchemy import Engine

from mailkit import (
    BUILTIN_FIELDS,
    MailkitError,
    Segment,
    count_segment,
    fetch_members,
    load_attribute_names,
    resolve_segment,
)
from mailkit.notebook import SEGMENT_OPERATORS, SegmentCondition, build_segment_expression

from ._common import layout, render_frame, show_error

__all__ = ["ConditionRow", "SegmentBuilder"]


class ConditionRow(w.HBox):  # type: ignore[misc]
    """One ``field op value`` row with a remove button."""

    def __init__(self, fields: list[str], *, field: str, op: str, value: str) -> None:
        self.field = w.Combobox(
            options=fields, value=field, placeholder="attribute", ensure_option=False
        )
        self.op = w.Dropdown(options=list(SEGMENT_OPERATORS), value=op, layout=layout(width="90px"))
        self.value = w.Text(value=value, placeholder="value (a, b, c for in)")
        self.remove = w.Button(description="×", layout=layout(width="36px"), tooltip="remove")
        super().__init__([self.field, self.op, self.value, self.remove])

    @property
    def condition(self) -> SegmentCondition:
        """The row as a SegmentCondition."""
        return SegmentCondition(str(self.field.value), str(self.op.value), str(self.value.value))


class SegmentBuilder(w.VBox):  # type: ignore[misc]
    """Rows joined by and/or, or a typed expression; live count, sample and expression.

    ``mode`` is ``"rows"`` or ``"expression"``. Use ``add_condition`` / ``set_expression``
    from code; the widgets' values may also be set directly, as a click would.
    """

    def __init__(
        self,
        db: Engine,
        *,
        expression: str | None = None,
        sample_size: int = 10,
    ) -> None:
        self.db = db
        self.sample_size = sample_size
        self.count: int | None = None
        self.sample: pd.DataFrame = pd.DataFrame()
        self.error: str | None = None
        self._fields = sorted(BUILTIN_FIELDS | load_attribute_names(db))
        self.mode = w.ToggleButtons(options=["rows", "expression"], value="rows")
        self.join = w.ToggleButtons(options=["and", "or"], value="and")
        self.rows_box = w.VBox([])
        self.add_button = w.Button(description="+ condition", icon="plus")
        self.expression_text = w.Textarea(
            placeholder="prefecture == '東京都' and age >= 30",
            continuous_update=False,
            layout=layout(width="100%", height="60px"),
        )
        self.produced = w.HTML()
        self.count_html = w.HTML()
        self.error_html = w.HTML()
        self.sample_html = w.HTML()
        self.add_button.on_click(lambda _b: self.add_condition())
        for control in (self.mode, self.join, self.expression_text):
            control.observe(self._changed, names="value")
        super().__init__(
            [
                self.mode,
                self.join,
                self.rows_box,
                self.add_button,
                self.expression_text,
                self.produced,
                self.count_html,
                self.error_html,
                self.sample_html,
            ]
        )
        if expression is not None:
            self.set_expression(expression)
        else:
            self.refresh()

    # -- editing --------------------------------------------------------------------------

    @property
    def rows(self) -> list[ConditionRow]:
        """The condition rows, in order."""
        return list(self.rows_box.children)

    def add_condition(self, field: str = "", op: str = "==", value: str = "") -> ConditionRow:
        """Append a row (and switch to rows mode); returns it."""
        row = ConditionRow(self._fields, field=field, op=op, value=value)
        for control in (row.field, row.op, row.value):
            control.observe(self._changed, names="value")
        row.remove.on_click(lambda _b: self.remove_condition(row))
        self.rows_box.children = [*self.rows_box.children, row]
        if self.mode.value != "rows":
            self.mode.value = "rows"  # refreshes through the observer
        else:
            self.refresh()
        return row

    def remove_condition(self, row: ConditionRow) -> None:
        """Remove a row."""
        self.rows_box.children = [r for r in self.rows_box.children if r is not row]
        self.refresh()

    def set_expression(self, expression: str) -> None:
        """Switch to expression mode with this text."""
        self.expression_text.value = expression
        if self.mode.value != "expression":
            self.mode.value = "expression"
        else:
            self.refresh()

    def set_join(self, join: Literal["and", "or"]) -> None:
        """Join rows with ``and`` or ``or``."""
        self.join.value = join

    # -- results --------------------------------------------------------------------------

    @property
    def expression(self) -> str:
        """The segment expression as typed or as the rows produce it; SegmentError if bad."""
        if self.mode.value == "expression":
            return str(self.expression_text.value).strip() or "all"
        join: Literal["and", "or"] = "or" if self.join.value == "or" else "and"
        return build_segment_expression([row.condition for row in self.rows], join=join)

    @property
    def segment(self) -> Segment:
        """The compiled segment; raises the SegmentError shown inline when there is one."""
        return resolve_segment(self.db, self.expression)

    def refresh(self) -> None:
        """Recompute the expression, count and sample, showing any error inline."""
        self.join.layout.display = "" if self.mode.value == "rows" else "none"
        self.rows_box.layout.display = "" if self.mode.value == "rows" else "none"
        self.add_button.layout.display = "" if self.mode.value == "rows" else "none"
        self.expression_text.layout.display = "" if self.mode.value == "expression" else "none"
        self.error, self.count, self.sample = None, None, pd.DataFrame()
        self.error_html.value = ""
        try:
            expression = self.expression
            self.produced.value = f"<b>expression</b> <code>{html.escape(expression)}</code>"
            self.count = count_segment(self.db, expression)
            self.sample = fetch_members(self.db, expression, limit=self.sample_size)
        except MailkitError as exc:
            self.error = show_error(self.error_html, exc)
            self.count_html.value = "<b>members</b> –"
            self.sample_html.value = ""
            return
        self.count_html.value = f"<b>members</b> {self.count:,}"
        self.sample_html.value = render_frame(self.sample, max_rows=self.sample_size)

    def _changed(self, _change: Any) -> None:
        self.refresh()
