"""Sending a campaign: preflight, snapshot, then the ledger-driven run; pause and resume.

``send_campaign`` starts a draft (every member rendered with every variant first; the segment
snapshotted into the ledger) or resumes a campaign, and sends every recipient that is due over
``concurrency`` persistent SMTP connections. Several processes may run it on one campaign at
once: they claim different rows. See ``ledger`` for the guarantees and ``_loop`` for the run.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from sqlalchemy import Engine, func, or_, select, update
from sqlalchemy.exc import IntegrityError

from .._aio import run_sync
from ..campaigns import Campaign, load_campaign, snapshot_campaign
from ..dkim import DKIMSigner
from ..errors import CampaignError, ConfigError
from ..scheduling import format_local, load_sending_window
from ..segments import fetch_members
from ..storage.schema import campaigns, messages, utcnow
from ..variants import assign_variants
from . import _loop
from .ledger import (
    DEFAULT_LEASE,
    count_states,
    finish_if_done,
    new_worker_id,
    recover_stale_rows,
    release_rows,
    requeue_unknown,
    retire_worker_id,
)
from .pacing import (
    DEFAULT_PACING,
    Clock,
    DomainPacer,
    PacingRule,
    SafetyStop,
    SystemClock,
    load_slowdowns,
    relay_key,
)
from .pipeline import (
    CampaignContent,
    MessageFactory,
    Tracker,
    build_message_factory,
    load_campaign_content,
    load_dkim_signer,
    preflight_campaign,
)
from .transport import parse_smtp_url

__all__ = [
    "SendResult",
    "pause_campaign",
    "prepare_message_factory",
    "resume_campaign",
    "send_campaign",
    "send_campaign_async",
]


@dataclass(frozen=True)
class SendResult:
    """What one ``send_campaign`` call did, and where the campaign stands after it.

    ``attempted``: SMTP transactions this call started; ``outcomes``: their results (``sent``,
    ``bounce`` = hard bounce, ``fail`` = other permanent refusal, ``defer``, ``unknown``);
    ``ledger``: rows per state for the whole campaign; ``recovered_unknown``: rows an earlier
    run left in flight, now ``unknown``; ``note``: why this call stopped before the campaign
    was done (relay busy, sending window closed, domains slowed down), if it did.
    """

    campaign_id: int
    status: str
    status_reason: str | None
    attempted: int
    outcomes: dict[str, int]
    ledger: dict[str, int]
    recovered_unknown: int
    note: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "campaign_id": self.campaign_id,
            "status": self.status,
            "status_reason": self.status_reason,
            "attempted": self.attempted,
            "outcomes": dict(self.outcomes),
            "ledger": dict(self.ledger),
            "recovered_unknown": self.recovered_unknown,
            "note": self.note,
        }


def _set_status(
    db: Engine, campaign_id: int, status: str, reason: str | None, *, only_from: tuple[str, ...]
) -> bool:
    with db.begin() as conn:
        changed = conn.execute(
            update(campaigns)
            .where(campaigns.c.id == campaign_id, campaigns.c.status.in_(only_from))
            .values(status=status, status_reason=reason)
        ).rowcount
    return bool(changed)


def pause_campaign(db: Engine, campaign_id: int, reason: str | None = None) -> None:
    """Pause a sending campaign. Running senders (any process) notice it before their next
    message and stop; rows in flight finish. Resume with ``resume_campaign`` or by sending."""
    campaign = load_campaign(db, campaign_id)
    if campaign.status == "paused":
        return
    reason = reason or f"paused by the operator at {format_local(utcnow())}"
    if not _set_status(db, campaign_id, "paused", reason, only_from=("sending",)):
        raise CampaignError(
            f"campaign {campaign_id} is {campaign.status}; only a sending campaign can be "
            "paused (clear a draft's send_at to keep it from starting)"
        )


def resume_campaign(db: Engine, campaign_id: int) -> None:
    """Let a paused campaign send again (the next ``send_campaign`` or ``run-due`` sends it)."""
    campaign = load_campaign(db, campaign_id)
    if campaign.status == "sending":
        return
    if not _set_status(db, campaign_id, "sending", None, only_from=("paused",)):
        raise CampaignError(f"campaign {campaign_id} is {campaign.status}, not paused")


def prepare_message_factory(
    db: Engine,
    campaign: Campaign,
    *,
    dkim: DKIMSigner | bool = True,
    tracker: Tracker | None = None,
) -> MessageFactory:
    """The campaign's message factory: templates (and variants) checked and compiled, the
    MIME skeleton built, the DKIM signer from ``dkim`` (True: from the MAILKIT_DKIM_* settings
    when configured; False: unsigned)."""
    signer = dkim if isinstance(dkim, DKIMSigner) else (load_dkim_signer() if dkim else None)
    return build_message_factory(
        campaign, load_campaign_content(db, campaign), signer=signer, tracker=tracker
    )


def _start(
    db: Engine, campaign: Campaign, factory: MessageFactory, tracker: Tracker | None
) -> None:
    members = fetch_members(db, campaign.segment)
    records = [{str(k): v for k, v in row.items()} for row in members.to_dict("records")]
    preflight_campaign(factory.content, records, tracker=tracker)
    try:
        snapshot_campaign(db, campaign.id)
    except (CampaignError, IntegrityError):
        # Another process (an overlapping run-due) started it first: join it.
        if load_campaign(db, campaign.id).status == "draft":
            raise


def _assign_variants_once(db: Engine, campaign_id: int, content: CampaignContent) -> None:
    """Deal the A/B variants to the ledger right after the snapshot (or, after a crash in
    between, on the next run): once, before anything is sent."""
    if len(content.templates) < 3:  # the campaign's own template plus at least two variants
        return
    m = messages.c
    with db.connect() as conn:
        touched = conn.execute(
            select(func.count()).where(
                m.campaign_id == campaign_id, or_(m.state != "queued", m.variant.is_not(None))
            )
        ).scalar_one()
    if touched:
        return
    # A concurrent run may have assigned them first (CampaignError): nothing left to do then.
    with contextlib.suppress(CampaignError):
        assign_variants(db, campaign_id)


def _reopen_for_unknown(db: Engine, campaign_id: int) -> bool:
    """Put a finished campaign's unknown rows back in the queue and the campaign back to
    sending, in one transaction; False when it had none."""
    with db.begin() as conn:
        requeued = conn.execute(
            update(messages)
            .where(messages.c.campaign_id == campaign_id, messages.c.state == "unknown")
            .values(state="queued", updated_at=utcnow())
        ).rowcount
        if requeued:
            conn.execute(
                update(campaigns)
                .where(campaigns.c.id == campaign_id, campaigns.c.status == "finished")
                .values(status="sending", finished_at=None)
            )
    return bool(requeued)


def send_campaign(db: Engine, campaign_id: int, smtp_url: str, **options: Any) -> SendResult:
    """Send (or resume) a campaign over SMTP; blocking. See ``send_campaign_async``."""
    return run_sync(send_campaign_async(db, campaign_id, smtp_url, **options))


async def send_campaign_async(
    db: Engine,
    campaign_id: int,
    smtp_url: str,
    *,
    concurrency: int = 4,
    resend_unknown: bool = False,
    progress: bool = False,
    dkim: DKIMSigner | bool = True,
    tracker: Tracker | bool | None = None,
    pacing: Mapping[str, PacingRule] | None = None,
    default_pacing: PacingRule | None = None,
    safety: SafetyStop | None = None,
    clock: Clock | None = None,
    lease: timedelta = DEFAULT_LEASE,
    max_wait: float = 60.0,
    stop: asyncio.Event | None = None,
) -> SendResult:
    """Send every due recipient of a campaign, starting it first if it is a draft.

    A draft is preflighted (every member rendered with every variant; PreflightError lists
    who fails, nothing is sent) and snapshotted into the ledger. A paused campaign resumes.
    Rows left ``sending`` by a dead worker become ``unknown`` and are not re-sent unless
    ``resend_unknown``. Deferred rows whose retry time has not come stay deferred: run again
    later (``run-due`` from cron does).

    ``dkim``: a signer, True (from MAILKIT_DKIM_* when set) or False. ``tracker``: the tracking
    seam (unsubscribe URL, tracked HTML, List-Unsubscribe, VERP envelope sender); None builds
    the campaign's own tracker when a tracking base URL is known (the campaign's, else
    ``MAILKIT_TRACKING_URL``) and otherwise sends without one, saying so in the result's note;
    False never tracks. ``pacing``
    overrides ``DEFAULT_PACING`` per domain, ``default_pacing`` the rule for other domains;
    ``safety`` the bounce-rate stop; ``clock`` the time source (tests); ``max_wait`` the
    longest this call waits for a slowed-down domain or the relay before leaving those rows
    to a later run.

    SIGTERM and Ctrl-C (in the main thread) end the run cleanly: messages in flight get their
    answer recorded, unsent claims are released, the campaign stays ``sending``. ``stop`` does
    the same when it is set; given one, the caller owns the signals and no handler is
    installed here (``run_worker`` keeps its own across runs).
    """
    if concurrency < 1:
        raise CampaignError("concurrency must be at least 1")
    clock = clock or SystemClock()
    target = parse_smtp_url(smtp_url)
    campaign = load_campaign(db, campaign_id)
    if campaign.status == "finished":
        # The operator may still ask for the unknown rows once the rest is done.
        if not (resend_unknown and _reopen_for_unknown(db, campaign_id)):
            return _result(db, campaign_id, None, 0)
        campaign = load_campaign(db, campaign_id)
    tracker, tracking_note = _resolve_tracker(db, campaign, tracker)
    factory = prepare_message_factory(db, campaign, dkim=dkim, tracker=tracker)
    if campaign.status == "draft":
        _start(db, campaign, factory, tracker)
    elif campaign.status == "paused":
        resume_campaign(db, campaign_id)
    campaign = load_campaign(db, campaign_id)
    if campaign.status != "sending":
        return _result(db, campaign_id, None, 0)
    _assign_variants_once(db, campaign_id, factory.content)

    now = clock.now()
    relay = relay_key(target.host, target.port)
    window = load_sending_window(db, campaign_id)
    if window is not None and not window.is_open(now):
        opens = format_local(window.next_open(now), window.timezone)
        note = f"outside the sending window {window.describe()}; nothing sent, opens {opens}"
        return _result(db, campaign_id, None, 0, note=note)
    slowdowns = load_slowdowns(db)
    busy = slowdowns.get(relay)
    if busy is not None and busy.slow_until is not None and busy.slow_until > now:
        wait = (busy.slow_until - now).total_seconds()
        if wait > max_wait:
            note = f"the relay {target.where} is slowed down until {format_local(busy.slow_until)}"
            return _result(db, campaign_id, None, 0, note=note)
        await clock.sleep(wait)
        now = clock.now()

    recovered = recover_stale_rows(db, campaign_id, now=now)
    if resend_unknown:
        requeue_unknown(db, campaign_id)
    pacer = DomainPacer(
        rules={**DEFAULT_PACING, **(pacing or {})}, default=default_pacing or DomainPacer().default
    )
    pacer.update_slowdowns(slowdowns)
    assert campaign.started_at is not None
    run = _loop.Run(
        db=db,
        campaign_id=campaign_id,
        started_at=campaign.started_at,
        owner=new_worker_id(),
        target=target,
        factory=factory,
        clock=clock,
        pacer=pacer,
        safety=safety or SafetyStop(),
        lease=lease,
        max_wait=max_wait,
        window=window,
        relay=relay,
        batch=max(16, concurrency * 8),
        max_held=max(64, concurrency * 64),
    )
    try:
        await _drive(run, concurrency, progress, stop)
    finally:
        release_rows(db, run.held_ids(), run.owner)
        retire_worker_id(run.owner)
    if run.fatal is not None:
        raise run.fatal
    if run.stop_reason is not None:
        _set_status(db, campaign_id, "paused", run.stop_reason, only_from=("sending",))
    elif run.external_status is None and run.halt_note is None:
        finish_if_done(db, campaign_id, now=clock.now())
    notes = [n for n in (run.halt_note, *run.notes, tracking_note) if n]
    return _result(db, campaign_id, run, recovered, note="; ".join(notes) if notes else None)


def _resolve_tracker(
    db: Engine, campaign: Campaign, tracker: Tracker | bool | None
) -> tuple[Tracker | None, str | None]:
    if tracker is False:
        return None, None
    if tracker is not None and tracker is not True:
        return tracker, None
    from ..tracking.tracker import TRACKING_URL_ENV, build_tracker, resolve_base_url

    try:
        resolve_base_url(None, campaign.tracking_base_url)
    except ConfigError:
        if tracker is True:
            raise
        return None, (
            f"no tracking base URL (campaign tracking_base_url or {TRACKING_URL_ENV}): sent "
            "without open/click tracking, unsubscribe links or VERP bounce addresses"
        )
    return build_tracker(db, campaign.id), None


def _stop_on_signals(run: _loop.Run) -> list[signal.Signals]:
    """In the main thread, let SIGTERM and Ctrl-C stop the run cleanly: messages in flight
    get their answer recorded, claims are released, nothing is left ``unknown``."""
    if threading.current_thread() is not threading.main_thread():
        return []
    loop = asyncio.get_running_loop()
    installed = []
    for sig in (signal.SIGTERM, signal.SIGINT):
        try:
            loop.add_signal_handler(sig, run.halt, f"stopped by {sig.name}; resume with send")
        except (NotImplementedError, RuntimeError, ValueError):
            continue
        installed.append(sig)
    return installed


async def _halt_when_set(run: _loop.Run, stop: asyncio.Event) -> None:
    await stop.wait()
    run.halt("stopped on request; the rest stays queued for the next run")


async def _drive(
    run: _loop.Run, concurrency: int, progress: bool, stop: asyncio.Event | None
) -> None:
    writer = _loop.LedgerWriter(run)
    run.writer = writer
    handled = _stop_on_signals(run) if stop is None else []
    watcher = asyncio.create_task(_halt_when_set(run, stop)) if stop is not None else None
    if progress:
        from tqdm.auto import tqdm

        due = count_states(run.db, run.campaign_id)
        run.progress = tqdm(
            total=due["queued"] + due["deferred"], unit="msg", desc=f"campaign {run.campaign_id}"
        )
    writer_task = asyncio.create_task(writer.run())
    try:
        await asyncio.gather(*(_loop.work(run) for _ in range(concurrency)))
    finally:
        if watcher is not None:
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher
        writer.close()
        try:
            await writer_task
        except BaseException as exc:
            run.fail(exc)
        if run.progress is not None:
            run.progress.close()
        for sig in handled:
            asyncio.get_running_loop().remove_signal_handler(sig)


def _result(
    db: Engine,
    campaign_id: int,
    run: _loop.Run | None,
    recovered: int,
    *,
    note: str | None = None,
) -> SendResult:
    campaign = load_campaign(db, campaign_id)
    return SendResult(
        campaign_id=campaign_id,
        status=campaign.status,
        status_reason=campaign.status_reason,
        attempted=run.attempted if run is not None else 0,
        outcomes=dict(run.outcomes) if run is not None else dict.fromkeys(_loop.OUTCOME_KINDS, 0),
        ledger=count_states(db, campaign_id),
        recovered_unknown=recovered,
        note=note,
    )
