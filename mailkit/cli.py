"""The ``mailkit`` command: a thin layer over the library.

Every command opens the workspace database given by ``--db`` / ``MAILKIT_DB`` (created and
migrated on first use). ``--json`` prints exactly one JSON object on stdout; errors go to
stderr with a non-zero exit code (1 for a failed operation, 2 for bad usage).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click
from sqlalchemy import Engine

from . import __version__
from .errors import MailkitError, PreflightError
from .storage import open_db, schema_revision


class _Context:
    def __init__(self, db_url: str | None) -> None:
        self.db_url = db_url
        self._engine: Engine | None = None

    @property
    def db(self) -> Engine:
        if self._engine is None:
            self._engine = open_db(self.db_url)
        return self._engine


def _emit(data: dict[str, Any], as_json: bool, text: Callable[[], None]) -> None:
    if as_json:
        click.echo(json.dumps(data, ensure_ascii=False, default=str))
    else:
        text()


def _fail(message: str) -> None:
    click.echo(f"error: {message}", err=True)
    sys.exit(1)


class _Group(click.Group):
    """Turns mailkit's own errors into one clear line on stderr and exit code 1."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except PreflightError as exc:
            click.echo(f"error: {exc}", err=True)
            for failure in exc.failures[:20]:
                click.echo(f"  {failure.email}: {failure.error}", err=True)
            sys.exit(1)
        except MailkitError as exc:
            _fail(str(exc))


json_option = click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--db",
    "db_url",
    envvar="MAILKIT_DB",
    default=None,
    metavar="URL",
    help="Workspace database URL [env MAILKIT_DB; default sqlite:///mailkit.db].",
)
@click.version_option(__version__, prog_name="mailkit")
@click.pass_context
def cli(ctx: click.Context, db_url: str | None) -> None:
    """mailkit: email campaigns from contacts to report."""
    ctx.obj = _Context(db_url)


@cli.command()
@json_option
@click.pass_obj
def init(obj: _Context, as_json: bool) -> None:
    """Create the workspace database, or upgrade it to the newest schema."""
    revision = schema_revision(obj.db)
    url = obj.db.url.render_as_string(hide_password=True)
    _emit(
        {"db": url, "revision": revision},
        as_json,
        lambda: click.echo(f"workspace ready: {url} (schema {revision})"),
    )


# --- contacts -------------------------------------------------------------------------------


@cli.group()
def contacts() -> None:
    """Import and inspect contacts."""


@contacts.command("import")
@click.argument("path", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--list", "list_name", metavar="NAME", help="Add every imported contact to a list.")
@click.option("--encoding", metavar="E", help="File encoding (default: detect UTF-8/BOM/CP932).")
@json_option
@click.pass_obj
def contacts_import(
    obj: _Context, path: Path, list_name: str | None, encoding: str | None, as_json: bool
) -> None:
    """Import contacts from a CSV file (one transaction; bad rows are reported)."""
    from .contacts import import_contacts

    report = import_contacts(
        obj.db, path, list_name=list_name, encoding=encoding, progress=not as_json
    )

    def text() -> None:
        click.echo(
            f"{report.source}: {report.rows} rows ({report.encoding}) — "
            f"{report.added} added, {report.updated} updated, {report.unchanged} unchanged, "
            f"{len(report.rejected)} rejected"
        )
        for bad in report.rejected:
            click.echo(f"  row {bad.row}: {bad.value!r}: {bad.reason}")

    _emit(report.to_dict(), as_json, text)


@contacts.command("list")
@click.option("--list", "list_name", metavar="NAME", help="Only members of this list.")
@click.option("--limit", type=int, default=20, show_default=True)
@click.pass_obj
def contacts_list(obj: _Context, list_name: str | None, limit: int) -> None:
    """Show contacts with their attributes."""
    from .contacts import load_contacts

    frame = load_contacts(obj.db, list_name=list_name)
    click.echo(frame.head(limit).to_string(index=False) if len(frame) else "(no contacts)")
    click.echo(f"{len(frame)} contacts")


# --- segments -------------------------------------------------------------------------------


@cli.group()
def segment() -> None:
    """Count and preview segments (expressions like DataFrame.query)."""


@segment.command("count")
@click.argument("expr")
@json_option
@click.pass_obj
def segment_count(obj: _Context, expr: str, as_json: bool) -> None:
    """Count the contacts an expression selects (suppressed addresses never count)."""
    from .segments import count_segment

    count = count_segment(obj.db, expr)
    _emit({"expression": expr, "count": count}, as_json, lambda: click.echo(count))


@segment.command("show")
@click.argument("expr")
@click.option("--limit", type=int, default=20, show_default=True)
@click.pass_obj
def segment_show(obj: _Context, expr: str, limit: int) -> None:
    """Show the first members of a segment."""
    from .segments import fetch_members

    frame = fetch_members(obj.db, expr, limit=limit)
    click.echo(frame.to_string(index=False) if len(frame) else "(no members)")


# --- templates ------------------------------------------------------------------------------


@cli.group()
def template() -> None:
    """Store templates (Jinja, sandboxed)."""


@template.command("add")
@click.argument("name")
@click.option("--subject", required=True, help="Subject template, e.g. '{{ name }}様へ'.")
@click.option("--html", "html_file", required=True, type=click.Path(exists=True, dir_okay=False))
@click.option("--text", "text_file", type=click.Path(exists=True, dir_okay=False))
@json_option
@click.pass_obj
def template_add(
    obj: _Context,
    name: str,
    subject: str,
    html_file: str,
    text_file: str | None,
    as_json: bool,
) -> None:
    """Add a template, or a new version of it when its content changed."""
    from .templates import compile_template, save_template

    html = Path(html_file).read_text(encoding="utf-8")
    text = Path(text_file).read_text(encoding="utf-8") if text_file else None
    saved = save_template(obj.db, name, subject=subject, html=html, text=text)
    compile_template(saved)
    _emit(
        {"id": saved.id, "name": saved.name, "version": saved.version},
        as_json,
        lambda: click.echo(f"template {saved.name!r} version {saved.version} (id {saved.id})"),
    )


# --- campaigns ------------------------------------------------------------------------------


@cli.group()
def campaign() -> None:
    """Create and send campaigns."""


@campaign.command("create")
@click.argument("name")
@click.option("--template", "template_name", required=True, metavar="NAME")
@click.option("--segment", "segment_expr", required=True, metavar="EXPR")
@click.option("--from", "from_addr", required=True, metavar="ADDR")
@click.option("--reply-to", metavar="ADDR")
@click.option(
    "--tracking-url",
    metavar="URL",
    help="Public URL of the tracking server (`mailkit serve`) for this campaign's links "
    "[default: MAILKIT_TRACKING_URL when it sends].",
)
@click.option("--no-tracking", is_flag=True, help="No open pixel or tracked links.")
@json_option
@click.pass_obj
def campaign_create(
    obj: _Context,
    name: str,
    template_name: str,
    segment_expr: str,
    from_addr: str,
    reply_to: str | None,
    tracking_url: str | None,
    no_tracking: bool,
    as_json: bool,
) -> None:
    """Create a draft campaign (checks the template, segment and addresses now)."""
    from .campaigns import create_campaign
    from .segments import count_segment

    created = create_campaign(
        obj.db,
        name,
        template=template_name,
        segment=segment_expr,
        from_addr=from_addr,
        reply_to=reply_to,
        tracking=not no_tracking,
        tracking_url=tracking_url,
    )
    members = count_segment(obj.db, segment_expr)
    _emit(
        {"id": created.id, "name": created.name, "status": created.status, "members": members},
        as_json,
        lambda: click.echo(
            f"campaign {created.id} {created.name!r}: draft, {members} recipients today"
        ),
    )


@campaign.command("send")
@click.argument("campaign_id", type=int)
@click.option(
    "--smtp",
    "smtp_url",
    envvar="MAILKIT_SMTP_URL",
    required=True,
    metavar="URL",
    help="smtp://host:port, smtp+starttls://user:pass@host:587 or smtps://host:465 "
    "[env MAILKIT_SMTP_URL].",
)
@click.option("--concurrency", type=click.IntRange(1, 64), default=4, show_default=True)
@click.option(
    "--processes",
    type=click.IntRange(1, 64),
    default=1,
    show_default=True,
    metavar="N",
    help="Render, sign and send from N processes (one CPU core each), within the same "
    "concurrency and per-domain limits in all.",
)
@click.option("--resend-unknown", is_flag=True, help="Re-send rows whose outcome is unknown.")
@click.option(
    "--bounce-threshold",
    type=click.FloatRange(0, 1, max_open=True),
    default=0.05,
    show_default=True,
    help="Pause when more than this fraction of the first recipients hard-bounce.",
)
@click.option(
    "--bounce-sample",
    type=click.IntRange(1),
    default=1000,
    show_default=True,
    metavar="N",
    help="How many first recipients the bounce threshold watches.",
)
@click.option(
    "--max-wait",
    type=click.FloatRange(0),
    default=60.0,
    show_default=True,
    metavar="SECONDS",
    help="Longest wait for a slowed-down domain or relay before leaving it to a later run.",
)
@json_option
@click.pass_obj
def campaign_send(
    obj: _Context,
    campaign_id: int,
    smtp_url: str,
    concurrency: int,
    processes: int,
    resend_unknown: bool,
    bounce_threshold: float,
    bounce_sample: int,
    max_wait: float,
    as_json: bool,
) -> None:
    """Send a campaign, or resume it (also a paused one); one message per recipient.

    The progress bar shows live sent / deferred / failed counts; `mailkit report ID` shows
    the same counts from another terminal while it runs.
    """
    from .dispatch import SafetyStop, send_campaign

    result = send_campaign(
        obj.db,
        campaign_id,
        smtp_url,
        concurrency=concurrency,
        processes=processes,
        resend_unknown=resend_unknown,
        progress=not as_json,
        safety=SafetyStop(
            threshold=bounce_threshold, first=bounce_sample, min_sample=min(100, bounce_sample)
        ),
        max_wait=max_wait,
    )

    def text() -> None:
        o, ledger = result.outcomes, result.ledger
        click.echo(
            f"campaign {campaign_id}: {result.status} — this run: {o.get('sent', 0)} sent, "
            f"{o.get('bounce', 0)} bounced, {o.get('fail', 0)} failed, "
            f"{o.get('defer', 0)} deferred, {o.get('unknown', 0)} unknown"
        )
        click.echo("ledger: " + ", ".join(f"{k} {v}" for k, v in ledger.items()))
        if result.recovered_unknown:
            click.echo(
                f"{result.recovered_unknown} recipients were in flight when an earlier run "
                "stopped: marked unknown, not re-sent (use --resend-unknown to send them)."
            )
        if result.note:
            click.echo(f"note: {result.note}")

    _emit(result.to_dict(), as_json, text)
    if result.status == "paused":
        click.echo(f"error: campaign paused: {result.status_reason}", err=True)
        sys.exit(1)


@campaign.command("dry-run")
@click.argument("campaign_id", type=int)
@click.option(
    "--dir",
    "directory",
    type=click.Path(file_okay=False, path_type=Path),
    required=True,
    help="Folder for the .eml files (created if missing).",
)
@click.option("--limit", type=click.IntRange(1), default=None, help="Only the first N.")
@json_option
@click.pass_obj
def campaign_dry_run(
    obj: _Context, campaign_id: int, directory: Path, limit: int | None, as_json: bool
) -> None:
    """Render, sign and write every message as .eml files; send nothing, change nothing."""
    from .dispatch import save_dry_run

    dry = save_dry_run(obj.db, campaign_id, directory, limit=limit)

    def text() -> None:
        click.echo(f"{len(dry.files)} messages written to {dry.folder}")
        for failure in dry.failures[:20]:
            click.echo(f"  {failure.email}: {failure.error}")

    _emit(dry.to_dict(), as_json, text)


@campaign.command("test")
@click.argument("campaign_id", type=int)
@click.option("--to", "to_addr", required=True, metavar="ADDR", help="Where the test goes.")
@click.option(
    "--smtp",
    "smtp_url",
    envvar="MAILKIT_SMTP_URL",
    required=True,
    metavar="URL",
    help="The SMTP server [env MAILKIT_SMTP_URL].",
)
@click.option(
    "--as",
    "as_contact",
    metavar="EMAIL",
    default=None,
    help="Render with this recipient's data (default: the first recipient).",
)
@json_option
@click.pass_obj
def campaign_test(
    obj: _Context,
    campaign_id: int,
    to_addr: str,
    smtp_url: str,
    as_contact: str | None,
    as_json: bool,
) -> None:
    """Send one recipient's message to ADDR with "[TEST]" in the subject; no ledger change."""
    from .dispatch import send_campaign_test

    outcome = send_campaign_test(obj.db, campaign_id, to_addr, smtp_url, contact=as_contact)
    data = {"to": to_addr, "outcome": outcome.kind, "reply": outcome.reply}
    _emit(data, as_json, lambda: click.echo(f"test to {to_addr}: {outcome.kind} ({outcome.reply})"))
    if outcome.kind != "sent":
        sys.exit(1)


@campaign.command("pause")
@click.argument("campaign_id", type=int)
@click.option("--reason", default=None, help="Shown in reports and to whoever resumes it.")
@click.pass_obj
def campaign_pause(obj: _Context, campaign_id: int, reason: str | None) -> None:
    """Pause a sending campaign; running senders stop before their next message."""
    from .dispatch import pause_campaign

    pause_campaign(obj.db, campaign_id, reason)
    click.echo(
        f"campaign {campaign_id} paused; resume with `mailkit campaign resume {campaign_id}`"
    )


@campaign.command("resume")
@click.argument("campaign_id", type=int)
@click.pass_obj
def campaign_resume(obj: _Context, campaign_id: int) -> None:
    """Let a paused campaign send again (the next `campaign send` or `run-due` sends it)."""
    from .dispatch import resume_campaign

    resume_campaign(obj.db, campaign_id)
    click.echo(f"campaign {campaign_id} may send again")


def _parse_when(value: str) -> Any:
    from datetime import datetime
    from zoneinfo import ZoneInfo

    try:
        when = datetime.fromisoformat(value)
    except ValueError:
        raise click.BadParameter(f"{value!r} is not a time like 2026-04-01T09:00+09:00") from None
    # A time without a zone is Japan time, the zone the campaigns are planned in.
    return when if when.tzinfo is not None else when.replace(tzinfo=ZoneInfo("Asia/Tokyo"))


@campaign.command("schedule")
@click.argument("campaign_id", type=int)
@click.option("--at", "send_at", metavar="TIME", help="Start at TIME (ISO; no zone = Asia/Tokyo).")
@click.option("--clear", is_flag=True, help="Remove the start time (the draft stays a draft).")
@click.option("--window", metavar="HH:MM-HH:MM", help="Only send between these local times.")
@click.option("--no-window", is_flag=True, help="Remove the sending window.")
@click.option("--timezone", default="Asia/Tokyo", show_default=True, help="The window's zone.")
@json_option
@click.pass_obj
def campaign_schedule(
    obj: _Context,
    campaign_id: int,
    send_at: str | None,
    clear: bool,
    window: str | None,
    no_window: bool,
    timezone: str,
    as_json: bool,
) -> None:
    """Set when a draft starts and the hours it may send in; `mailkit run-due` sends it."""
    from .scheduling import format_local, schedule_campaign, set_sending_window

    if (send_at and clear) or (window and no_window):
        raise click.UsageError("--at/--clear and --window/--no-window exclude each other")
    data: dict[str, Any] = {"campaign_id": campaign_id}
    if send_at or clear:
        when = _parse_when(send_at) if send_at else None
        schedule_campaign(obj.db, campaign_id, when)
        data["send_at"] = when.isoformat() if when else None
    if window or no_window:
        start, _, end = (window or "").partition("-")
        set_sending_window(obj.db, campaign_id, start or None, end or None, timezone=timezone)
        data["window"] = window
    if len(data) == 1:
        raise click.UsageError("give --at, --clear, --window or --no-window")

    def text() -> None:
        if "send_at" in data:
            shown = (
                format_local(_parse_when(data["send_at"])) if data["send_at"] else "not scheduled"
            )
            click.echo(f"campaign {campaign_id} starts: {shown}")
        if "window" in data:
            click.echo(f"sending window: {window + ' ' + timezone if window else 'any time'}")

    _emit(data, as_json, text)


@campaign.command("list")
@click.pass_obj
def campaign_list(obj: _Context) -> None:
    """List campaigns, newest first."""
    from .campaigns import load_campaigns

    frame = load_campaigns(obj.db)
    click.echo(frame.to_string(index=False) if len(frame) else "(no campaigns)")


@cli.command("run-due")
@click.option(
    "--smtp",
    "smtp_url",
    envvar="MAILKIT_SMTP_URL",
    required=True,
    metavar="URL",
    help="The SMTP server [env MAILKIT_SMTP_URL].",
)
@click.option("--concurrency", type=click.IntRange(1, 64), default=4, show_default=True)
@click.option(
    "--confirm-late",
    "confirm_late",
    type=int,
    multiple=True,
    metavar="ID",
    help="Send this campaign even though it was due long ago (repeatable).",
)
@json_option
@click.pass_obj
def run_due_command(
    obj: _Context, smtp_url: str, concurrency: int, confirm_late: tuple[int, ...], as_json: bool
) -> None:
    """Send every due campaign: scheduled drafts whose time came, and retries that are due.

    Safe from cron every minute; overlapping runs share the work through the ledger.
    """
    from .scheduling import run_due

    runs = run_due(
        obj.db, smtp_url, confirm_late=confirm_late, concurrency=concurrency, progress=False
    )

    def text() -> None:
        if not runs:
            click.echo("nothing due")
        for run in runs:
            if run.result is not None:
                r = run.result
                note = f" — {r.note}" if r.note else ""
                click.echo(
                    f"campaign {run.campaign.id} {run.campaign.name!r}: {r.status}, "
                    f"{r.outcomes.get('sent', 0)} sent this run{note}"
                )
            else:
                click.echo(
                    f"campaign {run.campaign.id} {run.campaign.name!r}: skipped: {run.skipped}"
                )

    _emit({"runs": [run.to_dict() for run in runs]}, as_json, text)
    if any(run.skipped for run in runs):
        sys.exit(1)


# --- report ---------------------------------------------------------------------------------


@cli.command()
@click.argument("campaign_id", type=int)
@click.option(
    "--html",
    "html_path",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    metavar="FILE",
    help="Also write the campaign dashboard (charts, breakdowns, A/B test, definitions) to "
    "FILE as one self-contained HTML page that works offline.",
)
@json_option
@click.pass_obj
def report(obj: _Context, campaign_id: int, html_path: Path | None, as_json: bool) -> None:
    """Delivery report: recipients, sent, failed, bounced, deliverability."""
    from .analytics import build_report, save_dashboard_html

    rep = build_report(obj.db, campaign_id)
    data = rep.to_dict()
    if html_path is not None:
        data["html"] = str(save_dashboard_html(obj.db, campaign_id, html_path))

    def text() -> None:
        click.echo(format_report(rep))
        if html_path is not None:
            click.echo(f"dashboard written to {data['html']}")

    _emit(data, as_json, text)


def format_report(rep: Any) -> str:
    """The human-readable report (also printed by the demo)."""
    deliverability = (
        "n/a (nothing sent yet)" if rep.deliverability is None else (f"{rep.deliverability:.2f} %")
    )
    lines = [
        f"campaign {rep.campaign_id} {rep.name!r}: {rep.status}",
        f"  recipients      {rep.recipients:>8}",
        f"  sent            {rep.sent:>8}   (accepted {rep.accepted}, rejected {rep.rejected})",
        f"  bounced         {rep.bounced:>8}",
        f"  failed          {rep.failed:>8}",
        f"  pending         {rep.pending:>8}   (queued {rep.queued}, deferred {rep.deferred})",
        f"  unknown         {rep.unknown:>8}",
        f"  deliverability  {deliverability:>8}   = (1 − bounced / sent) × 100",
    ]
    if rep.status_reason:
        lines.append(f"  note: {rep.status_reason}")
    return "\n".join(lines)


# --- dkim ---------------------------------------------------------------------------------


@cli.group()
def dkim() -> None:
    """DKIM keys and the DNS records to publish."""


@dkim.command("keygen")
@click.option("--domain", required=True, help="The signing domain (d=), e.g. shop.example.jp.")
@click.option("--selector", required=True, help="The selector (s=), e.g. mk2026.")
@click.option(
    "--dir",
    "directory",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("dkim"),
    show_default=True,
    help="Where to write the private key (file mode 0600).",
)
@click.option(
    "--algorithm", type=click.Choice(["rsa", "ed25519"]), default="rsa", show_default=True
)
@click.option("--bits", type=int, default=2048, show_default=True, help="RSA key size.")
@click.option("--overwrite", is_flag=True, help="Replace an existing key file.")
@json_option
def dkim_keygen(
    domain: str,
    selector: str,
    directory: Path,
    algorithm: str,
    bits: int,
    overwrite: bool,
    as_json: bool,
) -> None:
    """Generate a DKIM key pair; print the DNS TXT record to publish."""
    from .dkim import generate_dkim_key_files

    path, record = generate_dkim_key_files(
        domain=domain,
        selector=selector,
        directory=directory,
        algorithm="ed25519" if algorithm == "ed25519" else "rsa",
        bits=bits,
        overwrite=overwrite,
    )

    def text() -> None:
        click.echo(f"private key written to {path} (mode 0600); keep it secret")
        click.echo("publish this TXT record:")
        click.echo(record.zone_line())

    _emit({"key_file": str(path), "name": record.name, "value": record.value}, as_json, text)


# --- sink, demo -----------------------------------------------------------------------------


@cli.command()
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", type=int, default=1025, show_default=True)
@click.option("--maildir", type=click.Path(file_okay=False), help="Store messages in a Maildir.")
@click.option("--mbox", type=click.Path(dir_okay=False), help="Store messages in an mbox file.")
def sink(host: str, port: int, maildir: str | None, mbox: str | None) -> None:
    """Run the embedded SMTP sink until interrupted (for trying things out)."""
    from .sink import serve_sink

    if maildir and mbox:
        raise click.UsageError("give --maildir or --mbox, not both")

    def ready(server: Any) -> None:
        where = maildir or mbox or "memory"
        click.echo(f"sink listening on {server.url}, storing in {where}; Ctrl-C stops it")

    serve_sink(host=host, port=port, maildir=maildir, mbox=mbox, on_ready=ready)


@cli.command()
@click.option(
    "--dir",
    "directory",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("demo-output"),
    show_default=True,
    help="Folder for the demo workspace (emptied first).",
)
def demo(directory: Path) -> None:
    """Run the whole pipeline on generated Japanese contacts and the embedded sink."""
    from .demo import run_demo

    run_demo(directory, echo=click.echo)


def _register_commands() -> None:
    # Commands that live in their own modules, to keep this file a thin index.
    from .cli_bounces import bounces
    from .cli_serve import serve
    from .cli_worker import worker

    cli.add_command(bounces)
    cli.add_command(serve)
    cli.add_command(worker)


_register_commands()


def main() -> None:
    cli(prog_name="mailkit")


if __name__ == "__main__":
    main()
