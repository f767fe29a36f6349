"""``mailkit worker``: the long-running sender, registered in :mod:`mailkit.cli`.

A thin layer over :func:`mailkit.dispatch.run_worker`: run one per machine (or several) against
one PostgreSQL workspace and they share every due campaign through the ledger.
"""

from __future__ import annotations

import json
import os
import socket
import sys
from collections.abc import Sequence

import click

from .scheduling import DueRun

__all__ = ["worker"]


def _describe_run(run: DueRun) -> str | None:
    """One line for a campaign a pass touched; None when this worker did nothing with it."""
    name = f"campaign {run.campaign.id} {run.campaign.name!r}"
    if run.result is None:
        return f"{name}: skipped: {run.skipped}"
    r = run.result
    started = f"started it (preflight of {r.preflighted:,} recipients); " if r.preflighted else ""
    if not r.attempted and r.status != "finished" and not started:
        return None  # every due row was claimed by another worker
    o = r.outcomes
    line = (
        f"{name}: {started}{o.get('sent', 0)} sent, {o.get('bounce', 0)} bounced, "
        f"{o.get('fail', 0)} failed, {o.get('defer', 0)} deferred, "
        f"{o.get('unknown', 0)} unknown — now {r.status}"
    )
    return line + (f" ({r.note})" if r.note else "")


@click.command("worker", context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--smtp",
    "smtp_url",
    envvar="MAILKIT_SMTP_URL",
    required=True,
    metavar="URL",
    help="The SMTP server or relay [env MAILKIT_SMTP_URL].",
)
@click.option(
    "--concurrency",
    type=click.IntRange(1, 64),
    default=4,
    show_default=True,
    help="SMTP connections this worker keeps open.",
)
@click.option(
    "--poll",
    type=click.FloatRange(0, min_open=True),
    default=5.0,
    show_default=True,
    metavar="SECONDS",
    help="How long to sleep after a pass with nothing to send.",
)
@click.option("--once", is_flag=True, help="One pass over the due campaigns, then exit.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON summary when it stops.")
def worker(smtp_url: str, concurrency: int, poll: float, once: bool, as_json: bool) -> None:
    """Send every due campaign, pass after pass, until SIGTERM or Ctrl-C.

    Due: scheduled drafts whose time came, and sending campaigns with recipients queued or
    with retries due. Run any number of workers, on any number of machines, against one
    PostgreSQL workspace: they claim different recipients, so each gets one message. A stop
    by signal lets messages in flight finish and gives the rest back to the other workers.
    """
    from .dispatch import parse_smtp_url, run_worker

    db = click.get_current_context().find_root().obj.db
    where = parse_smtp_url(smtp_url).safe_url  # the password left out

    def ready() -> None:
        # With --json, stdout is the summary alone: the line goes to stderr then.
        click.echo(
            f"worker {socket.gethostname()}:{os.getpid()} sending due campaigns via "
            f"{where} (concurrency {concurrency}); SIGTERM or Ctrl-C stops it",
            err=as_json,
        )

    def report(runs: Sequence[DueRun]) -> None:
        for run in runs:
            line = _describe_run(run)
            if line is not None:
                click.echo(line)

    summary = run_worker(
        db,
        smtp_url,
        poll=poll,
        once=once,
        concurrency=concurrency,
        progress=False,
        on_pass=None if as_json else report,
        on_ready=ready,
    )
    if as_json:
        click.echo(json.dumps(summary.to_dict(), ensure_ascii=False))
    else:
        o = summary.outcomes
        click.echo(
            f"worker stopped ({summary.stopped_by}) after {summary.passes} "
            f"pass{'es' if summary.passes != 1 else ''}: "
            f"{summary.attempted} messages attempted, {o.get('sent', 0)} sent, "
            f"{o.get('bounce', 0) + o.get('fail', 0)} failed, {o.get('defer', 0)} deferred, "
            f"{o.get('unknown', 0)} unknown"
        )
    if once and summary.skipped:
        sys.exit(1)
