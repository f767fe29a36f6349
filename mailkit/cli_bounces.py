"""``mailkit bounces``: ingest bounces and complaints, list the messages kept aside.

Registered in ``cli.py``; takes the workspace database from the ``mailkit`` group's context
object (``obj.db``) like every other command.
"""

from __future__ import annotations

import json
from datetime import timedelta
from typing import Any, Protocol

import click
from sqlalchemy import Engine

__all__ = ["bounces"]


class _HasDb(Protocol):
    @property
    def db(self) -> Engine: ...


def _emit(data: dict[str, Any], as_json: bool, lines: list[str]) -> None:
    if as_json:
        click.echo(json.dumps(data, ensure_ascii=False, default=str))
    else:
        for line in lines:
            click.echo(line)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def bounces() -> None:
    """Ingest bounces and complaints (DSN, ARF, others); list what was kept aside."""


@bounces.command("ingest")
@click.argument("paths", nargs=-1, metavar="PATH...")
@click.option(
    "--imap",
    "imap_urls",
    multiple=True,
    metavar="URL",
    help="An IMAP mailbox, imaps://user@host/INBOX (password: MAILKIT_IMAP_PASSWORD). "
    "UNSEEN messages are read and flagged seen once recorded.",
)
@click.option(
    "--soft-limit",
    default=3,
    show_default=True,
    type=click.IntRange(min=1),
    help="Soft bounces (distinct messages) that suppress an address...",
)
@click.option(
    "--soft-days",
    default=30,
    show_default=True,
    type=click.IntRange(min=1),
    help="...within this many days.",
)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@click.pass_obj
def ingest(
    obj: _HasDb,
    paths: tuple[str, ...],
    imap_urls: tuple[str, ...],
    soft_limit: int,
    soft_days: int,
    as_json: bool,
) -> None:
    """Ingest .eml files, mbox files, Maildir folders (PATH...) and IMAP mailboxes.

    Hard bounces and complaints suppress at once, soft bounces after --soft-limit within
    --soft-days; what cannot be used is kept aside (see list-rejects). Safe to re-run.
    """
    from .bounces import BouncePolicy, ingest_bounces

    if not paths and not imap_urls:
        raise click.UsageError("give at least one PATH or --imap URL")
    policy = BouncePolicy(soft_limit=soft_limit, soft_window=timedelta(days=soft_days))
    report = ingest_bounces(obj.db, [*paths, *imap_urls], policy=policy)
    data = report.to_dict()
    _emit(
        data,
        as_json,
        [
            f"{report.seen} messages: {report.hard} hard, {report.soft} soft, "
            f"{report.complaints} complaints, {report.suppressed} newly suppressed",
            f"kept aside: {report.unmatched} unmatched, {report.ignored} not bounces, "
            f"{report.rejected} unparseable; {report.duplicates} seen before",
        ],
    )


@bounces.command("list-rejects")
@click.option("--limit", default=50, show_default=True, type=click.IntRange(min=1))
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@click.pass_obj
def list_rejects(obj: _HasDb, limit: int, as_json: bool) -> None:
    """List the messages kept aside (unparseable, unmatched, not bounces), newest first."""
    from .bounces import count_bounce_rejects, load_bounce_rejects

    rows = load_bounce_rejects(obj.db, limit=limit)
    total = count_bounce_rejects(obj.db)
    lines = [
        f"{total} messages kept aside" + (f" (newest {len(rows)})" if total > len(rows) else "")
    ]
    lines += [
        f"{r.id:>6}  {r.received_at:%Y-%m-%d %H:%M}  {r.size:>8} B  {r.reason}\n        {r.source}"
        for r in rows
    ]
    _emit({"total": total, "rejects": [r.to_dict() for r in rows]}, as_json, lines)
