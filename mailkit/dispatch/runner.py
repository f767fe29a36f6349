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
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from sqlalchemy import Engine, update

from .._aio import run_sync
from ..campaigns import Campaign, load_campaign
from ..dkim import DKIMSigner
from ..errors import CampaignError, ConfigError
from ..scheduling import format_local, load_sending_window
from ..storage.schema import campaigns, messages, utcnow
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
    MessageFactory,
    Tracker,
    build_message_factory,
    load_campaign_content,
    load_dkim_signer,
)
from .starting import assign_variants_once, start_draft
from .transport import parse_smtp_url

__all__ = [
    "SendResult",
    "Starting",
    "pause_campaign",
    "prepare_message_factory",
    "resume_campaign",
    "send_campaign",
    "send_campaign_async",
    "start_campaign",
    "start_campaign_async",
]


@dataclass(frozen=True)
class SendResult:
    """What one ``send_campaign`` call did, and where the campaign stands after it.

    ``attempted``: SMTP transactions this call started; ``outcomes``: their results (``sent``,
    ``bounce`` = hard bounce, ``fail`` = other permanent refusal, ``defer``, ``unknown``);
    ``ledger``: rows per state for the whole campaign; ``recovered_unknown``: rows an earlier
    run left in flight, now ``unknown``; ``note``: why this call stopped before the campaign
    was done (relay busy, sending window closed, domains slowed down, another process still
    starting it), if it did; ``preflighted``: recipients this call rendered in the preflight
    of a draft it started (0 when another process started it).
    """

    campaign_id: int
    status: str
    status_reason: str | None
    attempted: int
    outcomes: dict[str, int]
    ledger: dict[str, int]
    recovered_unknown: int
    note: str | None = None
    preflighted: int = 0

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
            "preflighted": self.preflighted,
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


@dataclass(frozen=True)
class Starting:
    """A campaign made ready to send by ``start_campaign``: started (a draft preflighted and
    snapshotted, here or by another process), resumed (a paused one) or reopened (a finished
    one with ``resend_unknown``). ``result`` is set when there is nothing to send now (it is
    finished, another process is still starting it, it is not ``sending``); ``preflighted``
    counts the recipients this call rendered in the preflight."""

    campaign: Campaign
    factory: MessageFactory | None
    tracking_note: str | None
    preflighted: int
    result: SendResult | None = None


def start_campaign(db: Engine, campaign_id: int, **options: Any) -> Starting:
    """Start (or resume) a campaign without sending anything; blocking. See
    ``start_campaign_async``."""
    return run_sync(start_campaign_async(db, campaign_id, **options))


async def start_campaign_async(
    db: Engine,
    campaign_id: int,
    *,
    dkim: DKIMSigner | bool = True,
    tracker: Tracker | bool | None = None,
    resend_unknown: bool = False,
    clock: Clock | None = None,
    max_wait: float = 60.0,
    stop: asyncio.Event | None = None,
    processes: int = 1,
) -> Starting:
    """The first half of ``send_campaign_async``: the campaign ready to send, its message
    factory built, or the result to return when there is nothing to send. ``processes`` > 1
    shares a draft's preflight with forked helpers (see ``preflight_campaign``)."""
    clock = clock or SystemClock()
    campaign = load_campaign(db, campaign_id)
    if campaign.status == "finished":
        # The operator may still ask for the unknown rows once the rest is done.
        if not (resend_unknown and _reopen_for_unknown(db, campaign_id)):
            return Starting(campaign, None, None, 0, _result(db, campaign_id, None, 0))
        campaign = load_campaign(db, campaign_id)
    resolved, tracking_note = _resolve_tracker(db, campaign, tracker)
    factory = prepare_message_factory(db, campaign, dkim=dkim, tracker=resolved)
    preflighted = 0
    if campaign.status == "draft":
        # One process preflights and snapshots; the others wait for it, then join.
        started = await start_draft(
            db,
            campaign,
            factory.content,
            resolved,
            clock=clock,
            max_wait=max_wait,
            stop=stop,
            processes=processes,
        )
        preflighted = started.preflighted
        if started.note is not None:
            note = _result(db, campaign_id, None, 0, note=started.note)
            return Starting(campaign, factory, tracking_note, preflighted, note)
    elif campaign.status == "paused":
        resume_campaign(db, campaign_id)
    campaign = load_campaign(db, campaign_id)
    if campaign.status != "sending":
        done = _result(db, campaign_id, None, 0, preflighted=preflighted)
        return Starting(campaign, factory, tracking_note, preflighted, done)
    assign_variants_once(db, campaign_id, factory.content)
    return Starting(campaign, factory, tracking_note, preflighted)


def send_campaign(
    db: Engine, campaign_id: int, smtp_url: str, *, processes: int = 1, **options: Any
) -> SendResult:
    """Send (or resume) a campaign over SMTP; blocking. See ``send_campaign_async``.

    ``processes`` > 1 starts the campaign here, then sends it from that many forked processes
    (one core each: rendering and signing are CPU-bound), within the same ``concurrency`` and
    pacing limits in all; see ``parallel``. It needs POSIX fork, and the shared options only
    (no ``clock``, ``stop`` or tracker object).
    """
    if processes != 1:
        from .parallel import send_in_processes

        return send_in_processes(db, campaign_id, smtp_url, processes=processes, options=options)
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
    skip_domains: Collection[str] = (),
) -> SendResult:
    """Send every due recipient of a campaign, starting it first if it is a draft.

    A draft is preflighted (every member rendered with every variant; PreflightError lists
    who fails, nothing is sent) and snapshotted into the ledger, its A/B variants assigned in
    the snapshot's transaction, by one process only (see ``starting``): a call that finds
    another starting it waits for that, then joins the sending. A paused campaign resumes.
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
    to a later run, or for another process to finish starting the draft.

    SIGTERM and Ctrl-C (in the main thread) end the run cleanly: messages in flight get their
    answer recorded, unsent claims are released, the campaign stays ``sending``. ``stop`` does
    the same when it is set; given one, the caller owns the signals and no handler is
    installed here (``run_worker`` keeps its own across runs). ``skip_domains``: recipient
    domains this call leaves to other senders (``send_campaign(processes=N)`` deals the paced
    domains out so that each domain's limits hold).
    """
    if concurrency < 1:
        raise CampaignError("concurrency must be at least 1")
    clock = clock or SystemClock()
    target = parse_smtp_url(smtp_url)
    starting = await start_campaign_async(
        db,
        campaign_id,
        dkim=dkim,
        tracker=tracker,
        resend_unknown=resend_unknown,
        clock=clock,
        max_wait=max_wait,
        stop=stop,
    )
    if starting.result is not None:
        return starting.result
    campaign, factory = starting.campaign, starting.factory
    tracking_note, preflighted = starting.tracking_note, starting.preflighted
    assert factory is not None

    now = clock.now()
    relay = relay_key(target.host, target.port)
    window = load_sending_window(db, campaign_id)
    if window is not None and not window.is_open(now):
        opens = format_local(window.next_open(now), window.timezone)
        note = f"outside the sending window {window.describe()}; nothing sent, opens {opens}"
        return _result(db, campaign_id, None, 0, note=note, preflighted=preflighted)
    slowdowns = load_slowdowns(db)
    busy = slowdowns.get(relay)
    if busy is not None and busy.slow_until is not None and busy.slow_until > now:
        wait = (busy.slow_until - now).total_seconds()
        if wait > max_wait:
            note = f"the relay {target.where} is slowed down until {format_local(busy.slow_until)}"
            return _result(db, campaign_id, None, 0, note=note, preflighted=preflighted)
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
        skip_domains=frozenset(skip_domains),
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
    joined = "; ".join(notes) if notes else None
    return _result(db, campaign_id, run, recovered, note=joined, preflighted=preflighted)


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
        await run.settle_claims()
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
    preflighted: int = 0,
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
        preflighted=preflighted,
    )
