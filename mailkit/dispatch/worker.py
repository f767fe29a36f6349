"""Long-running dispatch workers (``mailkit worker``): several of them share every campaign.

A worker passes over the due campaigns again and again (``run_due``: scheduled drafts whose
time came, sending campaigns with recipients due) and, after a pass in which it had nothing to
send, sleeps ``poll`` seconds. Any number of workers on any number of machines may run against
one PostgreSQL workspace: they claim ledger rows with ``FOR UPDATE SKIP LOCKED``, so every
recipient goes to exactly one of them, and whichever sends a campaign's last row finishes it.
A draft scheduled for now is started (preflighted and snapshotted) by one of them, the one that
claims its start; the others wait for it and join the sending (see ``starting``).

SIGTERM or Ctrl-C (or ``stop``) ends a worker cleanly: messages in flight get their answer
recorded, unsent claims go back to the ledger for the others, nothing is left ``unknown``. A
worker that dies (``kill -9``, a lost machine) leaves at most ``concurrency`` rows ``unknown``
(their outcome cannot be known; they are not re-sent unless the operator asks); its other
claims are taken over by the next pass of a worker on the same host at once, and by workers
elsewhere when its lease (``DEFAULT_LEASE``, 10 minutes) runs out.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Engine

from .._aio import run_sync
from ..errors import ConfigError
from ..scheduling import DueRun, run_due_async
from . import _loop

__all__ = ["WorkerSummary", "run_worker", "run_worker_async"]

#: How long a worker leaves a campaign alone after it could not send it (a preflight failure,
#: a late campaign that needs ``run-due --confirm-late``) before trying again.
DEFAULT_RETRY_SKIPPED = 300.0


@dataclass(frozen=True)
class WorkerSummary:
    """What a worker did until it stopped.

    ``passes``: passes over the due campaigns; ``attempted``: SMTP transactions it started;
    ``outcomes``: their results summed over every campaign (``sent``, ``bounce``, ``fail``,
    ``defer``, ``unknown``, as in ``SendResult``); ``campaigns``: the campaigns it sent to;
    ``finished``: campaigns found finished at the end of a run that sent to them; ``skipped``:
    campaign id → why it was not sent (the latest reason); ``stopped_by``: ``SIGTERM``,
    ``SIGINT``, ``stop`` (the caller's event) or ``once``; ``preflights``: campaign id → how
    many times this worker preflighted it (rendered every recipient before starting it: with
    several workers, one of them does, once).
    """

    passes: int
    attempted: int
    outcomes: dict[str, int]
    campaigns: tuple[int, ...]
    finished: tuple[int, ...]
    skipped: dict[int, str]
    stopped_by: str
    preflights: dict[int, int] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "passes": self.passes,
            "attempted": self.attempted,
            "outcomes": dict(self.outcomes),
            "campaigns": list(self.campaigns),
            "finished": list(self.finished),
            "skipped": {str(k): v for k, v in self.skipped.items()},
            "stopped_by": self.stopped_by,
            "preflights": {str(k): v for k, v in self.preflights.items()},
        }


@dataclass
class _Tally:
    passes: int = 0
    attempted: int = 0
    outcomes: dict[str, int] = field(default_factory=lambda: dict.fromkeys(_loop.OUTCOME_KINDS, 0))
    campaigns: dict[int, None] = field(default_factory=dict)  # ordered set
    finished: dict[int, None] = field(default_factory=dict)
    skipped: dict[int, str] = field(default_factory=dict)
    preflights: dict[int, int] = field(default_factory=dict)
    stopped_by: str | None = None

    def add(self, runs: Sequence[DueRun]) -> int:
        """Count one pass; return how many transactions it started."""
        self.passes += 1
        started = 0
        for run in runs:
            if run.skipped is not None:
                self.skipped[run.campaign.id] = run.skipped
                continue
            result = run.result
            if result.preflighted:
                self.preflights[run.campaign.id] = self.preflights.get(run.campaign.id, 0) + 1
            started += result.attempted
            if result.attempted:
                self.campaigns[run.campaign.id] = None
                for kind, count in result.outcomes.items():
                    self.outcomes[kind] = self.outcomes.get(kind, 0) + count
            if result.status == "finished" and result.attempted:
                self.finished[run.campaign.id] = None
        self.attempted += started
        return started

    def summary(self) -> WorkerSummary:
        return WorkerSummary(
            passes=self.passes,
            attempted=self.attempted,
            outcomes=dict(self.outcomes),
            campaigns=tuple(self.campaigns),
            finished=tuple(self.finished),
            skipped=dict(self.skipped),
            stopped_by=self.stopped_by or "stop",
            preflights=dict(self.preflights),
        )


def _catch_signals(halt: asyncio.Event, tally: _Tally) -> list[signal.Signals]:
    """In the main thread, SIGTERM and Ctrl-C set ``halt`` for as long as the worker runs
    (the runs it makes install no handlers of their own, so these stay in place)."""
    if threading.current_thread() is not threading.main_thread():
        return []
    loop = asyncio.get_running_loop()

    def on_signal(sig: signal.Signals) -> None:
        if tally.stopped_by is None:
            tally.stopped_by = sig.name
        halt.set()

    installed = []
    for sig in (signal.SIGTERM, signal.SIGINT):
        try:
            loop.add_signal_handler(sig, on_signal, sig)
        except (NotImplementedError, RuntimeError, ValueError):
            continue
        installed.append(sig)
    return installed


async def _watch(stop: threading.Event, halt: asyncio.Event, tally: _Tally) -> None:
    # A threading.Event, so that another thread (a notebook cell, a test) can stop a worker
    # whose loop runs elsewhere; polled, because it has no awaitable side.
    while not stop.is_set():
        if halt.is_set():
            return
        await asyncio.sleep(0.1)
    if tally.stopped_by is None:
        tally.stopped_by = "stop"
    halt.set()


async def _rest(halt: asyncio.Event, seconds: float) -> None:
    """Sleep ``seconds`` or until ``halt`` is set, whichever comes first."""
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(halt.wait(), timeout=seconds)


async def run_worker_async(
    db: Engine,
    smtp_url: str,
    *,
    poll: float = 5.0,
    once: bool = False,
    stop: threading.Event | None = None,
    retry_skipped: float = DEFAULT_RETRY_SKIPPED,
    on_pass: Callable[[Sequence[DueRun]], None] | None = None,
    on_ready: Callable[[], None] | None = None,
    **send_options: Any,
) -> WorkerSummary:
    """Send every due campaign, pass after pass, until SIGTERM, Ctrl-C or ``stop``.

    ``poll``: seconds to sleep after a pass that started no SMTP transaction (nothing due, or
    every due row claimed by other workers). ``once``: one pass, then return (``run_due``).
    ``stop``: set it (from any thread) to end the worker cleanly, as SIGTERM does.
    ``retry_skipped``: seconds before a campaign that could not be sent (preflight failure,
    late) is tried again. ``on_pass`` is called with the runs of every pass that had any;
    ``on_ready`` once the signal handlers are in place (a stop from then on is clean).
    ``send_options`` go to ``send_campaign_async`` (concurrency, dkim, tracker, pacing, ...).

    Operation-level errors (the relay refuses the login, the database is unreachable) end
    the worker with the exception: run it under a supervisor (systemd, a container runtime)
    that restarts it.
    """
    if poll <= 0:
        raise ConfigError("the worker's poll interval must be a positive number of seconds")
    tally = _Tally()
    halt = asyncio.Event()
    handled = _catch_signals(halt, tally)
    watcher = asyncio.create_task(_watch(stop, halt, tally)) if stop is not None else None
    held_back: dict[int, float] = {}  # campaign id → when (monotonic) to try it again
    try:
        if on_ready is not None:
            on_ready()
        while not halt.is_set():
            now = time.monotonic()
            for campaign_id in [c for c, until in held_back.items() if until <= now]:
                del held_back[campaign_id]
            runs = await run_due_async(db, smtp_url, skip=set(held_back), stop=halt, **send_options)
            started = tally.add(runs)
            for run in runs:
                if run.skipped is not None:
                    held_back[run.campaign.id] = now + retry_skipped
            if runs and on_pass is not None:
                on_pass(runs)
            if once:
                tally.stopped_by = tally.stopped_by or "once"
                break
            if not started:
                await _rest(halt, poll)
    finally:
        if watcher is not None:
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher
        loop = asyncio.get_running_loop()
        for sig in handled:
            loop.remove_signal_handler(sig)
    return tally.summary()


def run_worker(db: Engine, smtp_url: str, **options: Any) -> WorkerSummary:
    """Blocking ``run_worker_async`` (see there). Outside the main thread (in Jupyter the
    loop runs in a helper thread) signals cannot reach it: pass ``stop=threading.Event()``."""
    return run_sync(run_worker_async(db, smtp_url, **options))
