"""Small pieces the widgets share: how errors and tables are shown."""

from __future__ import annotations

import html
from typing import Any

import ipywidgets as w
import pandas as pd

__all__ = ["render_error", "render_frame", "render_notice", "show_error"]


def render_error(message: str) -> str:
    """An inline error box; the message is escaped (it may quote user data)."""
    return (
        '<div style="color:#a40000;background:#fff0f0;border:1px solid #e0b4b4;'
        f'padding:4px 8px;white-space:pre-wrap">{html.escape(message)}</div>'
    )


def render_notice(message: str) -> str:
    """An inline notice, escaped."""
    return f'<div style="padding:2px 0">{html.escape(message)}</div>'


def render_frame(frame: pd.DataFrame, *, max_rows: int = 20) -> str:
    """A DataFrame as an escaped HTML table."""
    if frame.empty:
        return "<i>no rows</i>"
    return str(frame.head(max_rows).to_html(index=False, escape=True, na_rep=""))


def show_error(target: w.HTML, exc: BaseException) -> str:
    """Show ``exc`` in ``target`` and return its message (for the widget's ``.error``)."""
    message = f"{type(exc).__name__}: {exc}"
    target.value = render_error(message)
    return message


def layout(**kw: Any) -> w.Layout:
    """An ipywidgets Layout (typed helper)."""
    return w.Layout(**kw)
