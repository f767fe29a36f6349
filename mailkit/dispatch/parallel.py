"""One campaign sent by several processes on this machine (``send_campaign(processes=N)``).

Dispatch is CPU-bound: every message is rendered, built and DKIM-signed (an RSA private-key
operation) before it goes out, and one Python process uses one core. With ``processes=N`` the
calling process starts the campaign (the preflight and the snapshot happen once, here), then
forks N senders that share the ledger exactly as separate ``campaign send`` runs or ``mailkit
worker`` processes do: each claims its own rows, so nobody gets the campaign twice, and the
one that sends the last row finishes the campaign. The caller shows one progress bar for all
of them (read from the ledger) and returns one merged ``SendResult``.

The limits stay the caller's limits, whatever N is:

* ``concurrency`` SMTP transactions in all, dealt out between the senders;
* each domain with a pacing rule (the carriers, gmail.com, outlook.com, ``pacing=``...) is
  sent by exactly one of the senders, so its connection cap and messages-per-minute rate hold
  as given; the other domains are shared, each sender taking its share of the default rule;
* slow-downs after a ``421``/``4.7.x`` are shared through the database as always.

The senders are forked (POSIX ``fork``), so they inherit the DKIM key and the settings
without writing them anywhere; they open their own database connections. SIGTERM or Ctrl-C
stops every sender cleanly (in-flight answers recorded, claims released); a sender killed
outright leaves at most its in-flight rows ``unknown``, as any crash does.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import multiprocessing
import os
import pickle
import signal
import sys
import threading
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from typing import TYPE_CHECKING, Any

from sqlalchemy import Engine

from ..errors import CampaignError, ConfigError
from .ledger import count_states
from .pacing import DEFAULT_PACING, DEFAULT_RULE, PacingRule

if TYPE_CHECKING:
    from .runner import SendResult

__all__ = ["SenderShare", "build_shares", "preflight_in_processes", "send_in_processes"]

#: How often the caller reads the ledger for its progress bar while the senders work.
_PROGRESS_EVERY = 0.5
#: ... or, when a count takes longer than 1/20 of that, this many times as long as a count.
_PROGRESS_COST_SHARE = 20
_DONE_STATES = ("sent", "failed", "unknown")
_PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>


@dataclass(frozen=True)
class SenderShare:
    """What one of N senders may do: its SMTP transactions, the pacing rules of the domains
    it sends to, its share of the default rule, and the domains other senders handle (it
    never claims their rows)."""

    concurrency: int
    pacing: Mapping[str, PacingRule]
    default: PacingRule
    elsewhere: frozenset[str]


def build_shares(
    processes: int,
    concurrency: int,
    pacing: Mapping[str, PacingRule] | None = None,
    default: PacingRule | None = None,
) -> list[SenderShare]:
    """Deal ``concurrency`` and the pacing rules out to at most ``processes`` senders.

    Fewer senders than asked when there are fewer transactions than processes (a sender
    needs at least one). Every ruled domain goes to one sender (round robin, in name order);
    the default rule's connection cap and rate are divided between all of them.
    """
    if processes < 1:
        raise ConfigError("processes must be at least 1")
    if concurrency < 1:
        raise CampaignError("concurrency must be at least 1")
    n = min(processes, concurrency)
    rules = {**DEFAULT_PACING, **(pacing or {})}
    base = default or DEFAULT_RULE
    owner = {domain: i % n for i, domain in enumerate(sorted(rules))}
    shares = []
    for i in range(n):
        mine = {d: r for d, r in rules.items() if owner[d] == i}
        rate = base.per_minute
        shares.append(
            SenderShare(
                concurrency=concurrency // n + (1 if i < concurrency % n else 0),
                pacing=mine,
                default=PacingRule(
                    max_connections=max(1, base.max_connections // n),
                    per_minute=None if rate is None else max(1, rate // n),
                ),
                elsewhere=frozenset(d for d in rules if owner[d] != i),
            )
        )
    return shares


def send_in_processes(
    db: Engine,
    campaign_id: int,
    smtp_url: str,
    *,
    processes: int,
    options: dict[str, Any],
) -> SendResult:
    """``send_campaign(processes=N)``: start here, fork the senders, merge their results."""
    from .ledger import recover_stale_rows, requeue_unknown
    from .runner import start_campaign

    if "fork" not in multiprocessing.get_all_start_methods():
        raise ConfigError(
            "processes > 1 needs the POSIX fork start method, which this platform lacks: "
            "run several `mailkit worker` processes instead"
        )
    for name in ("clock", "stop"):
        if options.get(name) is not None:
            raise ConfigError(f"{name}= cannot be shared between processes: use processes=1")
    tracker = options.get("tracker")
    if tracker not in (None, True, False):
        raise ConfigError(
            "a tracker object cannot be shared between processes: pass tracker=None or True "
            "(each sender builds the campaign's own tracker) or use processes=1"
        )
    progress = bool(options.pop("progress", False))
    shares = build_shares(
        processes,
        options.pop("concurrency", 4),
        options.pop("pacing", None),
        options.pop("default_pacing", None),
    )
    resend_unknown = bool(options.pop("resend_unknown", False))
    started = start_campaign(
        db,
        campaign_id,
        dkim=options.get("dkim", True),
        tracker=tracker,
        resend_unknown=resend_unknown,  # a finished campaign is reopened for its unknown rows
        max_wait=options.get("max_wait", 60.0),
        processes=len(shares),
    )
    if started.result is not None:  # nothing to send (finished, being started elsewhere...)
        return started.result
    recovered = recover_stale_rows(db, campaign_id)
    if resend_unknown:
        requeue_unknown(db, campaign_id)
    # No pooled connection may cross the fork: each sender opens its own.
    db.dispose()
    children: list[tuple[Any, Connection]] = []
    with _frozen_heap():
        for k, share in enumerate(shares):
            child_options = {
                **options,
                "concurrency": share.concurrency,
                "pacing": share.pacing,
                "default_pacing": share.default,
                "skip_domains": share.elsewhere,
            }
            children.append(
                _fork(f"mailkit-sender-{k + 1}", _sender, db, campaign_id, smtp_url, child_options)
            )
    results: list[Any] = []
    errors: list[BaseException] = []
    with _forward_signals([p for p, _ in children]), _progress(db, campaign_id, progress) as show:
        pending = {receive: process for process, receive in children}
        while pending:
            for ready in wait(list(pending), timeout=_PROGRESS_EVERY):
                assert isinstance(ready, Connection)
                process = pending.pop(ready)
                try:
                    kind, payload = ready.recv()
                except EOFError:
                    process.join()
                    errors.append(
                        CampaignError(
                            f"sender {process.name} died (exit code {process.exitcode}); its "
                            "in-flight rows become unknown on the next run"
                        )
                    )
                    continue
                (results if kind == "ok" else errors).append(payload)
                process.join()
            show()
    if errors:
        raise errors[0]
    return _merge(db, campaign_id, results, started.preflighted, recovered)


@contextlib.contextmanager
def _frozen_heap() -> Iterator[None]:
    """Fork with the caller's objects frozen (``gc.freeze``), as the gc module's docs advise:
    a sender never collects what it inherited (a notebook's DataFrames, the imported
    libraries), which its full collections otherwise scanned again and again (measured:
    ~90 ms of a sender's CPU per 5,000 messages, 1 ms frozen). The caller is unfrozen at
    once; a caller that froze objects itself is left as it was."""
    if gc.get_freeze_count():
        yield
        return
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


def _fork(name: str, target: Any, *args: Any) -> tuple[Any, Connection]:
    """Fork a daemon process running ``target(its_end_of_a_pipe, *args)``; return the process
    and this end of the pipe."""
    here, there = multiprocessing.Pipe()
    process = multiprocessing.get_context("fork").Process(
        target=target, args=(there, *args), name=name, daemon=True
    )
    process.start()
    there.close()
    return process, here


def _sender(
    pipe: Connection,
    db: Engine,
    campaign_id: int,
    smtp_url: str,
    options: dict[str, Any],
) -> None:
    from .runner import send_campaign

    _stop_with_parent(signal.SIGTERM)
    # The parent disposed of its pool before forking, so this engine starts empty here.
    try:
        result = send_campaign(db, campaign_id, smtp_url, **options)
    except BaseException as exc:
        pipe.send(("error", _portable(exc)))
    else:
        pipe.send(("ok", result))
    finally:
        pipe.close()
        db.dispose()


def _stop_with_parent(signum: int) -> None:
    """Have the kernel send ``signum`` to this forked process when its parent dies (Linux), so
    that a parent killed outright leaves no sender running on its own: SIGTERM stops a sender
    cleanly, as it would a single ``campaign send``."""
    parent = os.getppid()
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signum)
    if os.getppid() != parent:  # the parent died before the request took effect
        os.kill(os.getpid(), signum)


def _portable(exc: BaseException) -> BaseException:
    """The exception itself when it survives pickling, else a CampaignError with its text."""
    try:
        pickle.loads(pickle.dumps(exc))  # noqa: S301  # our own object, round-tripped
    except Exception:
        return CampaignError(f"{type(exc).__name__}: {exc}")
    return exc


@contextlib.contextmanager
def _forward_signals(children: list[Any]) -> Iterator[None]:
    """SIGTERM/SIGINT to the caller stop every sender cleanly (Ctrl-C in a terminal reaches
    them all anyway; a SIGTERM sent to the caller alone would not)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def forward(signum: int, frame: Any) -> None:
        for child in children:
            if child.is_alive() and child.pid is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(child.pid, signal.SIGTERM)

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


@contextlib.contextmanager
def _progress(db: Engine, campaign_id: int, enabled: bool) -> Iterator[Any]:
    if not enabled:
        yield lambda: None
        return
    from tqdm.auto import tqdm

    first = count_states(db, campaign_id)
    done_before = sum(first.get(s, 0) for s in _DONE_STATES)
    bar = tqdm(total=sum(first.values()) - done_before, unit="msg", desc=f"campaign {campaign_id}")
    last = cost = 0.0

    def show(final: bool = False) -> None:
        nonlocal last, cost
        now = time.monotonic()
        # A count reads the campaign's whole ledger: on a big one it is read less often, so
        # that the bar never takes more than a twentieth of a core from the senders.
        if not final and now - last < max(_PROGRESS_EVERY, _PROGRESS_COST_SHARE * cost):
            return
        states = count_states(db, campaign_id)
        last = time.monotonic()
        cost = last - now
        bar.n = sum(states.get(s, 0) for s in _DONE_STATES) - done_before
        bar.set_postfix(
            sent=states.get("sent", 0),
            deferred=states.get("deferred", 0),
            failed=states.get("failed", 0),
            unknown=states.get("unknown", 0),
            refresh=False,
        )
        bar.refresh()

    try:
        yield show
        show(final=True)
    finally:
        bar.close()


def _merge(
    db: Engine,
    campaign_id: int,
    results: list[Any],
    preflighted: int,
    recovered: int,
) -> SendResult:
    from ..campaigns import load_campaign
    from .runner import SendResult

    campaign = load_campaign(db, campaign_id)
    outcomes: dict[str, int] = {}
    for result in results:
        for kind, n in result.outcomes.items():
            outcomes[kind] = outcomes.get(kind, 0) + n
    notes = list(dict.fromkeys(r.note for r in results if r.note))
    return SendResult(
        campaign_id=campaign_id,
        status=campaign.status,
        status_reason=campaign.status_reason,
        attempted=sum(r.attempted for r in results),
        outcomes=outcomes,
        ledger=count_states(db, campaign_id),
        recovered_unknown=recovered + sum(r.recovered_unknown for r in results),
        note="; ".join(notes) if notes else None,
        preflighted=preflighted,
    )


# -- the preflight, shared -------------------------------------------------------------------

#: Members per chunk handed to a preflight process: big enough that pickling them costs
#: little beside rendering them, small enough that the processes finish together.
_PREFLIGHT_CHUNK = 256


def preflight_in_processes(
    content: Any, members: Iterable[Mapping[str, Any]], tracker: Any, processes: int
) -> tuple[list[Any], int]:
    """``check_members`` shared with ``processes - 1`` forked helpers: this process reads
    ``members`` in order (a generator that renews a claim keeps working) and deals them out in
    chunks, rendering every ``processes``-th chunk itself. Without fork, it renders alone."""
    from .pipeline import check_members

    if processes < 2 or "fork" not in multiprocessing.get_all_start_methods():
        return check_members(content, members, tracker)
    helpers = [
        _fork(f"mailkit-preflight-{k + 1}", _preflight_helper, content, tracker)
        for k in range(processes - 1)
    ]
    failures: list[Any] = []
    checked = 0
    try:
        for k, chunk in enumerate(_chunks(members, _PREFLIGHT_CHUNK)):
            slot = k % processes
            if slot == 0:
                found, n = check_members(content, chunk, tracker)
                failures.extend(found)
                checked += n
            else:
                _hand_over(*helpers[slot - 1], chunk)
        for process, conn in helpers:
            _hand_over(process, conn, None)
        for process, conn in helpers:
            found, n = _collect(process, conn)
            failures.extend(found)
            checked += n
    finally:
        for process, conn in helpers:
            conn.close()
            process.join(timeout=5)
            if process.is_alive():
                process.kill()
    return failures, checked


def _hand_over(process: Any, conn: Connection, chunk: list[Mapping[str, Any]] | None) -> None:
    try:
        conn.send(chunk)
    except OSError:  # the helper stopped early: it said why, or died
        _collect(process, conn)
        raise CampaignError(f"preflight helper {process.name} stopped early") from None


def _collect(process: Any, conn: Connection) -> tuple[list[Any], int]:
    try:
        kind, payload, n = conn.recv()
    except EOFError:
        process.join(timeout=5)
        raise CampaignError(
            f"preflight helper {process.name} died (exit code {process.exitcode})"
        ) from None
    if kind == "error":
        raise payload
    return payload, n


def _preflight_helper(conn: Connection, content: Any, tracker: Any) -> None:
    from .pipeline import check_members

    _stop_with_parent(signal.SIGKILL)  # it only renders: nothing to leave half done

    failures: list[Any] = []
    checked = 0
    try:
        while (chunk := conn.recv()) is not None:
            found, n = check_members(content, chunk, tracker)
            failures.extend(found)
            checked += n
    except BaseException as exc:
        conn.send(("error", _portable(exc), 0))
    else:
        conn.send(("ok", failures, checked))
    finally:
        conn.close()


def _chunks(items: Iterable[Mapping[str, Any]], size: int) -> Iterator[list[Mapping[str, Any]]]:
    chunk: list[Mapping[str, Any]] = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk
