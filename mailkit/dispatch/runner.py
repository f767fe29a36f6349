"""Sending a campaign: ledger rows → rendered, built messages → SMTP, one recipient at a time.

``concurrency`` workers each hold one persistent SMTP connection and claim small batches of
ledger rows, so several processes on the same campaign share the work instead of repeating it.
Each row is marked ``sending`` (committed) before its SMTP transaction and gets the server's
answer (committed) right after it.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Engine, update

from .._aio import run_sync
from ..campaigns import Campaign, load_campaign, snapshot_campaign
from ..contacts import save_suppression
from ..errors import CampaignError, PreflightError, SMTPDeliveryError, TemplateError
from ..messages import build_message, make_message_id, message_to_bytes, parse_address
from ..segments import fetch_members
from ..storage.schema import campaigns, utcnow
from ..templates import (
    CompiledTemplate,
    build_context,
    compile_template,
    load_template,
    preflight_template,
)
from .ledger import (
    LedgerRow,
    claim_rows,
    count_states,
    fetch_contact_contexts,
    finish_if_done,
    mark_sending,
    new_worker_id,
    record_result,
    recover_stale_rows,
    release_rows,
    requeue_unknown,
    unmark_sending,
)
from .transport import Outcome, SMTPConnection, SMTPTarget, parse_smtp_url

__all__ = ["SendResult", "retry_delay", "send_campaign", "send_campaign_async"]

#: Postfix-like retry schedule for deferred recipients.
FIRST_RETRY = timedelta(minutes=5)
MAX_RETRY = timedelta(hours=4)
MAX_LIFETIME = timedelta(days=5)


def retry_delay(attempts: int) -> timedelta:
    """Delay before the next attempt after ``attempts`` failed ones: 5 min, doubling, ≤ 4 h."""
    delay: timedelta = FIRST_RETRY * (2 ** max(attempts - 1, 0))
    return min(delay, MAX_RETRY)


@dataclass(frozen=True)
class SendResult:
    """What one ``send_campaign`` call did, and where the campaign stands after it."""

    campaign_id: int
    status: str
    status_reason: str | None
    attempted: int
    outcomes: dict[str, int]
    ledger: dict[str, int]
    recovered_unknown: int

    def to_dict(self) -> dict[str, Any]:
        return {
            "campaign_id": self.campaign_id,
            "status": self.status,
            "status_reason": self.status_reason,
            "attempted": self.attempted,
            "outcomes": dict(self.outcomes),
            "ledger": dict(self.ledger),
            "recovered_unknown": self.recovered_unknown,
        }


@dataclass
class _Run:
    """State shared by the workers of one send call."""

    db: Engine
    campaign: Campaign
    template: CompiledTemplate
    target: SMTPTarget
    worker: str
    batch_size: int
    stop_reason: str | None = None
    fatal: BaseException | None = None
    outcomes: dict[str, int] = field(
        default_factory=lambda: dict.fromkeys(("sent", "bounce", "fail", "defer", "unknown"), 0)
    )
    progress: Any = None

    @property
    def stopping(self) -> bool:
        return self.stop_reason is not None or self.fatal is not None


def send_campaign(
    db: Engine,
    campaign_id: int,
    smtp_url: str,
    *,
    concurrency: int = 4,
    resend_unknown: bool = False,
    progress: bool = False,
) -> SendResult:
    """Send (or resume) a campaign over SMTP; blocking. See ``send_campaign_async``."""
    return run_sync(
        send_campaign_async(
            db,
            campaign_id,
            smtp_url,
            concurrency=concurrency,
            resend_unknown=resend_unknown,
            progress=progress,
        )
    )


async def send_campaign_async(
    db: Engine,
    campaign_id: int,
    smtp_url: str,
    *,
    concurrency: int = 4,
    resend_unknown: bool = False,
    progress: bool = False,
) -> SendResult:
    """Send every due recipient of a campaign, starting it first if it is a draft.

    A draft is preflighted (every member rendered; PreflightError lists who fails) and then
    snapshotted into the ledger. Rows left ``sending`` by a dead worker become ``unknown`` and
    are not re-sent unless ``resend_unknown``. Deferred rows whose retry time has not come stay
    deferred; run again later (or from cron) to retry them.
    """
    if concurrency < 1:
        raise CampaignError("concurrency must be at least 1")
    target = parse_smtp_url(smtp_url)
    campaign = load_campaign(db, campaign_id)
    if campaign.status == "finished":
        return _result(db, campaign_id, attempted=0, outcomes={}, recovered=0)
    template = load_template(db, campaign.template_id)
    compiled = compile_template(template)
    if campaign.status == "draft":
        _preflight(db, campaign, template)
        snapshot_campaign(db, campaign_id)
    elif template.version != campaign.template_version:
        raise CampaignError(
            f"template {template.name!r} changed since campaign {campaign_id} started "
            f"(version {campaign.template_version} → {template.version}); a running campaign "
            "keeps its content: restore the template or create a new campaign"
        )
    if campaign.status == "paused":
        _set_status(db, campaign_id, "sending", None)
    campaign = load_campaign(db, campaign_id)

    recovered = recover_stale_rows(db, campaign_id)
    if resend_unknown:
        requeue_unknown(db, campaign_id)

    run = _Run(db, campaign, compiled, target, new_worker_id(), batch_size=max(4, concurrency))
    if progress:
        from tqdm.auto import tqdm

        states = count_states(db, campaign_id)
        run.progress = tqdm(total=states["queued"] + states["deferred"], unit="msg", desc="send")
    try:
        # Each worker leases under its own id, so no two of them ever hold the same row.
        await asyncio.gather(*(_worker(run, f"{run.worker}:{i}") for i in range(concurrency)))
    finally:
        if run.progress is not None:
            run.progress.close()
    if run.fatal is not None:
        raise run.fatal
    if run.stop_reason is not None:
        _set_status(db, campaign_id, "paused", run.stop_reason)
    else:
        finish_if_done(db, campaign_id)
    return _result(db, campaign_id, sum(run.outcomes.values()), run.outcomes, recovered)


def _preflight(db: Engine, campaign: Campaign, template: Any) -> None:
    members = fetch_members(db, campaign.segment)
    records: list[dict[str, Any]] = [
        {str(k): v for k, v in row.items()} for row in members.to_dict("records")
    ]
    report = preflight_template(template, records)
    if not report.ok:
        shown = "; ".join(f"{f.email}: {f.error}" for f in report.failures[:5])
        more = f" (and {len(report.failures) - 5} more)" if len(report.failures) > 5 else ""
        raise PreflightError(
            f"{len(report.failures)} of {report.checked} recipients cannot be rendered: "
            f"{shown}{more}. Fix the template or the contacts; nothing was sent.",
            failures=report.failures,
        )


async def _worker(run: _Run, worker: str) -> None:
    connection: SMTPConnection | None = None
    claimed: list[LedgerRow] = []
    try:
        while not run.stopping:
            claimed = claim_rows(run.db, run.campaign.id, worker, run.batch_size)
            if not claimed:
                return
            contexts = fetch_contact_contexts(run.db, [r.contact_id for r in claimed])
            while claimed and not run.stopping:
                row = claimed[0]
                if connection is None:
                    connection = SMTPConnection(run.target)
                    await connection.open()
                outcome = await _deliver(run, worker, connection, row, contexts[row.contact_id])
                claimed.pop(0)
                if outcome.code == 421 or outcome.kind in ("defer", "unknown"):
                    # The server is closing or the session is in doubt: start afresh.
                    await connection.close()
                    connection = None
    except BaseException as exc:
        if run.fatal is None:
            run.fatal = exc
    finally:
        release_rows(run.db, [r.id for r in claimed], worker)
        if connection is not None:
            await connection.close()


async def _deliver(
    run: _Run, worker: str, connection: SMTPConnection, row: LedgerRow, context: dict[str, Any]
) -> Outcome:
    campaign = run.campaign
    sender = parse_address(campaign.from_addr, what="From")
    message_id = make_message_id(sender.domain)
    try:
        rendered = run.template.render(build_context(context))
    except TemplateError as exc:
        # The contact changed since the preflight: this recipient fails alone, visibly.
        record_result(
            run.db,
            campaign_id=campaign.id,
            row=row,
            state="failed",
            code=None,
            reply=f"template could not be rendered for this contact: {exc}",
        )
        run.outcomes["fail"] += 1
        return Outcome(kind="fail", code=None, reply=str(exc))
    message = build_message(
        rendered,
        from_addr=campaign.from_addr,
        to_addr=row.email,
        to_name=context.get("name") or None,
        reply_to=campaign.reply_to,
        message_id=message_id,
    )
    data = message_to_bytes(message)
    previous_state = "deferred" if row.attempts else "queued"
    mark_sending(run.db, row.id, worker, message_id)
    try:
        outcome = await connection.send(sender.addr_spec, row.email, data)
    except SMTPDeliveryError:
        # Raised only while (re)connecting, before any transaction for this row began.
        unmark_sending(run.db, row.id, worker, previous_state)
        raise
    _record(run, worker, row, outcome, previous_state)
    return outcome


def _record(run: _Run, worker: str, row: LedgerRow, outcome: Outcome, previous_state: str) -> None:
    now = utcnow()
    detail = {"code": outcome.code, "reply": outcome.reply, "source": "smtp"}
    db, campaign_id = run.db, run.campaign.id
    if outcome.kind == "sent":
        record_result(
            db,
            campaign_id=campaign_id,
            row=row,
            state="sent",
            code=outcome.code,
            reply=outcome.reply,
            event=("sent", detail),
            now=now,
        )
    elif outcome.kind == "bounce":
        record_result(
            db,
            campaign_id=campaign_id,
            row=row,
            state="failed",
            code=outcome.code,
            reply=outcome.reply,
            event=("bounce", {**detail, "kind": "hard"}),
            now=now,
        )
        save_suppression(
            db, row.email, reason="hard_bounce", detail=outcome.reply, campaign_id=campaign_id
        )
    elif outcome.kind == "fail":
        record_result(
            db,
            campaign_id=campaign_id,
            row=row,
            state="failed",
            code=outcome.code,
            reply=outcome.reply,
            event=("bounce", {**detail, "kind": "rejected"}),
            now=now,
        )
    elif outcome.kind == "defer":
        _record_deferral(run, row, outcome, now)
    elif outcome.kind == "unknown":
        record_result(
            db,
            campaign_id=campaign_id,
            row=row,
            state="unknown",
            code=outcome.code,
            reply=outcome.reply,
            now=now,
        )
    else:  # stop: a policy/authentication refusal concerns the sender, not this recipient
        unmark_sending(db, row.id, worker, previous_state)
        run.stop_reason = (
            f"the server refused the sender ({outcome.code} {outcome.reply}); the campaign is "
            "paused and nobody was suppressed. Check SPF/DKIM/DMARC and credentials, then "
            "resume with `campaign send`."
        )
    counted = "defer" if outcome.kind == "defer" else outcome.kind
    if counted in run.outcomes:
        run.outcomes[counted] += 1
        if run.progress is not None:
            run.progress.update(1)
            run.progress.set_postfix(run.outcomes, refresh=False)


def _record_deferral(run: _Run, row: LedgerRow, outcome: Outcome, now: datetime) -> None:
    attempts = row.attempts + 1
    created = run.campaign.started_at or now
    retry_at = now + retry_delay(attempts)
    if retry_at - created > MAX_LIFETIME:
        record_result(
            run.db,
            campaign_id=run.campaign.id,
            row=row,
            state="failed",
            code=outcome.code,
            reply=f"gave up after {attempts} attempts: {outcome.reply}",
            event=("bounce", {"code": outcome.code, "reply": outcome.reply, "kind": "expired"}),
            now=now,
        )
        return
    record_result(
        run.db,
        campaign_id=run.campaign.id,
        row=row,
        state="deferred",
        code=outcome.code,
        reply=outcome.reply,
        next_attempt_at=retry_at,
        now=now,
    )


def _set_status(db: Engine, campaign_id: int, status: str, reason: str | None) -> None:
    with db.begin() as conn:
        conn.execute(
            update(campaigns)
            .where(campaigns.c.id == campaign_id)
            .values(status=status, status_reason=reason)
        )


def _result(
    db: Engine, campaign_id: int, attempted: int, outcomes: dict[str, int], recovered: int
) -> SendResult:
    campaign = load_campaign(db, campaign_id)
    return SendResult(
        campaign_id=campaign_id,
        status=campaign.status,
        status_reason=campaign.status_reason,
        attempted=attempted,
        outcomes=dict(outcomes),
        ledger=count_states(db, campaign_id),
        recovered_unknown=recovered,
    )
