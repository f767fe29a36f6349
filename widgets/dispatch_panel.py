"""DispatchPanel: what will be sent, a test send, a named confirmation, progress, stop/resume.

How the kernel stays responsive: a confirmed send runs ``mailkit.send_campaign_async`` as an
asyncio task on the kernel's own event loop (the loop ipykernel runs between cells), next to a
small task that polls the ledger and updates the progress bar and counts. The cell returns at
once; other cells, widgets and Ctrl-C keep working while the campaign sends. Outside a running
loop (a plain script, a test) the same coroutine is run to completion instead. Headless
notebooks call ``send()``, which blocks until the run is over.

"Stop" pauses the campaign in the database (``pause_campaign``): the senders notice it before
their next message, messages in flight finish, and the run ends with the campaign ``paused``.
Nothing is left in doubt, and another process sending the same campaign stops too. "Resume"
sends the rest. Before the campaign has started (preflight, snapshot) Stop cancels the task.
"""

from __future__ import annotations

import asyncio
import html

import ipywidgets as w
from sqlalchemy import Engine

from mailkit import (
    ConfigError,
    MailkitError,
    Outcome,
    SendResult,
    count_states,
    load_settings,
    send_campaign_async,
)
from mailkit._aio import run_sync
from mailkit.dispatch import pause_campaign, send_campaign_test
from mailkit.notebook import DispatchPlan, load_dispatch_plan, unpaced_rules

from ._common import layout, render_error, render_notice, show_error

__all__ = ["DispatchPanel"]

FINAL_STATES = ("sent", "failed", "unknown")


class DispatchPanel(w.VBox):  # type: ignore[misc]
    """Send campaign ``campaign_id`` over ``smtp_url`` (default ``MAILKIT_SMTP_URL``)."""

    def __init__(
        self,
        db: Engine,
        campaign_id: int,
        smtp_url: str | None = None,
        *,
        concurrency: int = 4,
        test_address: str = "",
        poll_interval: float = 0.5,
        paced: bool = True,
    ) -> None:
        self.db = db
        self.campaign_id = campaign_id
        # Kept on the object only; what is displayed is DispatchPlan.smtp (no credentials).
        self._smtp_url = smtp_url or load_settings().smtp_url
        self.concurrency = concurrency
        # False lifts the per-domain rate limits: for a local sink (the demo) only.
        self.paced = paced
        self.poll_interval = poll_interval
        self.plan: DispatchPlan | None = None
        self.result: SendResult | None = None
        self.test_outcome: Outcome | None = None
        self.error: str | None = None
        self.task: asyncio.Task[SendResult | None] | None = None
        self.stopped = False

        self.plan_html = w.HTML()
        self.test_address = w.Text(value=test_address, placeholder="you@example.jp")
        self.test_button = w.Button(description="Send test")
        self.test_html = w.HTML()
        self.send_button = w.Button(description="Send…", button_style="primary")
        self.confirm_html = w.HTML()
        self.confirm_button = w.Button(button_style="danger")
        self.cancel_button = w.Button(description="Cancel")
        self.confirm_box = w.HBox([self.confirm_button, self.cancel_button])
        self.progress = w.IntProgress(value=0, min=0, max=1, layout=layout(width="60%"))
        self.counts_html = w.HTML()
        self.stop_button = w.Button(description="Stop", button_style="warning")
        self.resume_button = w.Button(description="Resume")
        self.status_html = w.HTML()
        self.error_html = w.HTML()

        self.test_button.on_click(lambda _b: self.send_test())
        self.send_button.on_click(lambda _b: self.request_send())
        self.confirm_button.on_click(lambda _b: self.start())
        self.cancel_button.on_click(lambda _b: self._hide_confirmation())
        self.stop_button.on_click(lambda _b: self.stop())
        self.resume_button.on_click(lambda _b: self.start())
        super().__init__(
            [
                self.plan_html,
                w.HBox([self.test_address, self.test_button]),
                self.test_html,
                self.send_button,
                self.confirm_html,
                self.confirm_box,
                w.HBox([self.progress, self.stop_button, self.resume_button]),
                self.counts_html,
                self.status_html,
                self.error_html,
            ]
        )
        self._hide_confirmation()
        self._set_running(False)
        self.refresh()

    # -- what will be sent ----------------------------------------------------------------

    def refresh(self) -> None:
        """Reload the plan and the ledger counts."""
        try:
            self.plan = load_dispatch_plan(self.db, self.campaign_id, self._smtp_url)
        except MailkitError as exc:
            self.error = show_error(self.error_html, exc)
            return
        plan = self.plan
        rows = [
            ("campaign", f"#{plan.campaign_id} {plan.campaign} ({plan.status})"),
            ("segment", plan.segment),
            ("recipients (after suppression)", f"{plan.recipients:,}"),
            ("From", plan.from_addr),
            ("Reply-To", plan.reply_to or "–"),
            ("DKIM", "on" if plan.dkim else "off"),
            ("schedule", plan.schedule),
            ("SMTP", plan.smtp or "not configured: set MAILKIT_SMTP_URL"),
        ]
        self.plan_html.value = (
            "<table>"
            + "".join(
                f"<tr><th style='text-align:left;padding-right:1em'>{html.escape(k)}</th>"
                f"<td>{html.escape(v)}</td></tr>"
                for k, v in rows
            )
            + "</table>"
        )
        self.update_counts()

    def update_counts(self) -> dict[str, int]:
        """Read the ledger and update the progress bar and counts; return the counts."""
        states = count_states(self.db, self.campaign_id)
        total = sum(states.values())
        done = sum(states[s] for s in FINAL_STATES)
        self.progress.max = max(total, 1)
        self.progress.value = done
        self.counts_html.value = " · ".join(f"{state} {n:,}" for state, n in states.items())
        return states

    # -- test send ------------------------------------------------------------------------

    def send_test(self, address: str | None = None) -> Outcome | None:
        """Send one ``[TEST]`` message to ``address`` (default: the address box)."""
        to_addr = (address or str(self.test_address.value)).strip()
        self.test_outcome = None
        self.test_html.value = ""
        try:
            smtp_url = self._require_smtp()
            self.test_outcome = send_campaign_test(self.db, self.campaign_id, to_addr, smtp_url)
        except MailkitError as exc:
            self.error = show_error(self.test_html, exc)
            return None
        outcome = self.test_outcome
        text = f"test message to {to_addr}: {outcome.kind} ({outcome.code} {outcome.reply})"
        self.test_html.value = render_notice(text) if outcome.kind == "sent" else render_error(text)
        return outcome

    # -- the real send --------------------------------------------------------------------

    def request_send(self) -> int:
        """Show the confirmation, naming the recipient count; return that count."""
        self.refresh()
        count = self.plan.recipients if self.plan is not None else 0
        name = self.plan.campaign if self.plan is not None else str(self.campaign_id)
        self.confirm_button.description = f"Yes, send to {count:,} recipients"
        self.confirm_html.value = render_notice(
            f"Send {name!r} to {count:,} recipients now? This cannot be undone."
        )
        self.confirm_html.layout.display = ""
        self.confirm_box.layout.display = ""
        return count

    def start(self) -> asyncio.Task[SendResult | None] | None:
        """Start (or resume) sending; returns the task when a loop is running.

        In a kernel the send runs as a task on the kernel's loop and this returns at once;
        with no running loop it runs to completion here and returns None.
        """
        self._hide_confirmation()
        if self.task is not None and not self.task.done():
            return self.task
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            run_sync(self.send_async())
            return None
        self.task = loop.create_task(self.send_async())
        self._set_running(True)  # at once, not when the task first runs
        # The error is shown inline; retrieving it keeps asyncio from logging it again.
        self.task.add_done_callback(lambda t: t.cancelled() or t.exception())
        return self.task

    def send(self) -> SendResult | None:
        """Send (or resume) and block until done: for headless notebooks and scripts."""
        self._hide_confirmation()
        return run_sync(self.send_async())

    async def send_async(self) -> SendResult | None:
        """The send itself, with live counts; None when stopped. Errors show and re-raise."""
        self.error, self.result, self.stopped = None, None, False
        self.error_html.value = ""
        self.status_html.value = render_notice("sending…")
        self._set_running(True)
        poller = asyncio.create_task(self._poll())
        try:
            smtp_url = self._require_smtp()
            self.result = await send_campaign_async(
                self.db,
                self.campaign_id,
                smtp_url,
                concurrency=self.concurrency,
                pacing=None if self.paced else unpaced_rules(),
            )
        except asyncio.CancelledError:
            self.stopped = True
            self.status_html.value = render_notice(
                "stopped: unsent recipients stay queued; Resume sends them"
            )
            return None
        except MailkitError as exc:
            self.error = show_error(self.error_html, exc)
            self.status_html.value = ""
            raise
        finally:
            poller.cancel()
            self.refresh()
            self._set_running(False)
        result = self.result
        self.stopped = result.status == "paused"
        reason = f": {result.status_reason}" if result.status_reason else ""
        self.status_html.value = render_notice(
            f"campaign {result.status}{reason}; this run: {result.outcomes}"
        )
        return result

    def stop(self) -> bool:
        """Pause the campaign so that the running send stops; True if one was running.

        Before the campaign has started sending (preflight, snapshot) the task is cancelled.
        """
        if self.task is None or self.task.done():
            return False
        try:
            pause_campaign(self.db, self.campaign_id, "stopped from the DispatchPanel")
        except MailkitError:
            self.task.cancel()  # still a draft: nothing was sent yet
        return True

    # -- internals ------------------------------------------------------------------------

    async def _poll(self) -> None:
        while True:
            self.update_counts()
            await asyncio.sleep(self.poll_interval)

    def _require_smtp(self) -> str:
        if not self._smtp_url:
            raise ConfigError("no SMTP server: set MAILKIT_SMTP_URL or pass smtp_url")
        return self._smtp_url

    def _set_running(self, running: bool) -> None:
        self.send_button.disabled = running
        self.test_button.disabled = running
        self.stop_button.layout.display = "" if running else "none"
        paused = self.stopped or (self.plan is not None and self.plan.status == "paused")
        self.resume_button.layout.display = "" if paused and not running else "none"

    def _hide_confirmation(self) -> None:
        self.confirm_html.layout.display = "none"
        self.confirm_box.layout.display = "none"
