"""One send run: the dispatcher that hands out rows, the workers, and the group-commit writer.

``concurrency`` workers each hold one persistent SMTP connection. They take rows from the
run's dispatcher, which claims them from the ledger in batches and hands out only rows whose
recipient domain may be sent to now (pacing). Every ledger change goes through the writer,
which commits whatever the workers submitted since its last commit in one transaction: a
worker's outcome and its next ``sending`` mark land in the same or consecutive commits.

A worker submits its row's mark and starts the SMTP transaction at once, but sends the data's
final dot, after which the server may deliver, only once the mark is committed: the commit
overlaps the envelope's round trip instead of preceding it. If the mark is refused (the lease
ran out and another worker has the row) or the run is stopping, the connection is dropped
before the dot and the server discards the message. A crash before the commit leaves the row
claimed (it is sent again after its lease), after it ``sending`` (``unknown`` on resume), as
before: nothing the server may have delivered is ever unrecorded.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Engine, select

from ..errors import AddressError, SMTPDeliveryError, TemplateError
from ..scheduling import SendingWindow, format_local
from ..storage.engine import WriteLockBusy, connect_for_reading
from ..storage.schema import campaigns
from .commits import (
    LedgerOp,
    MarkSending,
    RecordOutcome,
    RevertSending,
    SlowDown,
    apply_ledger_ops,
)
from .ledger import (
    LedgerRow,
    claim_rows,
    count_bounce_sample,
    fetch_contact_contexts,
    release_rows,
    renew_leases,
)
from .pacing import MAX_LIFETIME, Clock, DomainPacer, SafetyStop, retry_delay
from .pipeline import MessageFactory, Outgoing
from .transport import Outcome, SMTPConnection, SMTPTarget

OUTCOME_KINDS = ("sent", "bounce", "fail", "defer", "unknown")
# At most this many event-loop passes gather ops into one commit (see LedgerWriter.run).
_GATHER_PASSES = 8


@dataclass
class Run:
    """The state of one send run, shared by its workers (all on one event loop)."""

    db: Engine
    campaign_id: int
    started_at: datetime
    owner: str
    target: SMTPTarget
    factory: MessageFactory
    clock: Clock
    pacer: DomainPacer
    safety: SafetyStop
    lease: timedelta
    max_wait: float
    window: SendingWindow | None
    relay: str
    batch: int
    max_held: int
    # Domains another sender of the same campaign handles (``send_campaign(processes=N)``).
    skip_domains: frozenset[str] = frozenset()
    progress: Any = None
    # Why the run stops early: ``stop_reason`` pauses the campaign (policy refusal, safety
    # stop); ``halt_note`` only ends this run (relay busy, window closed, domains slowed).
    stop_reason: str | None = None
    halt_note: str | None = None
    external_status: str | None = None
    fatal: BaseException | None = None
    attempted: int = 0
    notes: list[str] = field(default_factory=list)
    _relay_busy: bool = False
    outcomes: dict[str, int] = field(default_factory=lambda: dict.fromkeys(OUTCOME_KINDS, 0))
    _held: dict[str, deque[LedgerRow]] = field(default_factory=dict)
    _order: deque[str] = field(default_factory=deque)
    _held_count: int = 0
    _contexts: dict[int, dict[str, Any]] = field(default_factory=dict)
    _excluded: set[str] = field(default_factory=set)
    _exhausted: bool = False
    _claiming: asyncio.Task[None] | None = None
    _renewed_at: datetime | None = None
    _status_checked_at: datetime | None = None
    _safety_done: bool = False
    _finals_unchecked: int = 0
    writer: LedgerWriter | None = None

    @property
    def stopping(self) -> bool:
        return (
            self.stop_reason is not None
            or self.halt_note is not None
            or self.external_status is not None
            or self.fatal is not None
        )

    def fail(self, exc: BaseException) -> None:
        if self.fatal is None:
            self.fatal = exc

    def halt(self, note: str) -> None:
        if self.halt_note is None:
            self.halt_note = note

    def stop(self, reason: str) -> None:
        if self.stop_reason is None:
            self.stop_reason = reason

    # -- the dispatcher ------------------------------------------------------------------

    async def next_row(self) -> LedgerRow | None:
        """The next row to send, when its domain may be sent to; None when the run is over."""
        while True:
            if self.stopping:
                return None
            now = self.clock.now()
            if self.window is not None and not self.window.is_open(now):
                opens = format_local(self.window.next_open(now), self.window.timezone)
                self.halt(f"the sending window {self.window.describe()} closed; reopens {opens}")
                return None
            self._keep_leases(now)
            row, wait = self._pick(now)
            if row is not None:
                self.pacer.take(row.recipient_domain, now)
                if self._held_count < self.batch // 2:
                    self._claim_ahead(now)
                return row
            if not self._exhausted and self._held_count < self.max_held:
                await self._claimed(now)
                continue
            if self._held_count == 0:
                return None
            assert wait is not None
            if wait > self.max_wait:
                self._give_up_slow_domains(now)
                continue
            self._check_status(now)
            await self.clock.sleep(min(wait, 1.0))

    def _pick(self, now: datetime) -> tuple[LedgerRow | None, float | None]:
        best: float | None = None
        order = self._order
        for _ in range(len(order)):
            domain = order[0]
            order.rotate(-1)  # the next pick starts at the next domain: fair between domains
            wait = self.pacer.wait(domain, now)
            if wait <= 0:
                rows = self._held[domain]
                row = rows.popleft()
                self._held_count -= 1
                if not rows:
                    del self._held[domain]
                    order.pop()
                return row, None
            best = wait if best is None else min(best, wait)
        return None, best

    # Claims run in a thread, one at a time, and the next one starts while the rows held
    # still last: with several senders on one SQLite file a claim may wait for the write lock,
    # and on the event loop's thread that wait stopped every worker of this process.

    def _claim_ahead(self, now: datetime) -> None:
        if self._claiming is None and not self._exhausted and not self.stopping:
            self._claiming = asyncio.get_running_loop().create_task(self._claim(now))

    async def _claimed(self, now: datetime) -> None:
        """Wait for the claim in flight, or for a new one."""
        self._claim_ahead(now)
        await self.settle_claims()

    async def settle_claims(self) -> None:
        """Wait for a claim in flight, so that its rows are held (and can be released)."""
        if self._claiming is not None:
            # Shielded: a cancelled worker must not cancel the claim other workers wait for.
            await asyncio.shield(self._claiming)

    async def _claim(self, now: datetime) -> None:
        try:
            rows, contexts = await asyncio.to_thread(
                self._fetch_claim, now, frozenset(self._excluded | self.skip_domains)
            )
        except Exception as exc:  # a worker that waits for it stops on ``fatal``
            self.fail(exc)
            return
        finally:
            self._claiming = None
        if not rows:
            self._exhausted = True
            return
        self._contexts.update(contexts)
        # Domains given up on while this claim ran go back at once.
        given_up = [row.id for row in rows if row.recipient_domain in self._excluded]
        if given_up:
            release_rows(self.db, given_up, self.owner)
        for row in rows:
            if row.recipient_domain not in self._excluded:
                self._hold(row)

    def _fetch_claim(
        self, now: datetime, excluded: frozenset[str]
    ) -> tuple[list[LedgerRow], dict[int, dict[str, Any]]]:
        rows = claim_rows(
            self.db,
            self.campaign_id,
            self.owner,
            self.batch,
            now=now,
            lease=self.lease,
            exclude_domains=excluded,
        )
        contexts = fetch_contact_contexts(self.db, [r.contact_id for r in rows]) if rows else {}
        return rows, contexts

    def _hold(self, row: LedgerRow) -> None:
        domain = row.recipient_domain
        rows = self._held.get(domain)
        if rows is None:
            rows = self._held[domain] = deque()
            self._order.append(domain)
        rows.append(row)
        self._held_count += 1

    def give_back(self, row: LedgerRow) -> None:
        """A row picked but not attempted: keep it for later (released at the end)."""
        self._hold(row)

    def held_ids(self) -> list[int]:
        return [row.id for rows in self._held.values() for row in rows]

    def _keep_leases(self, now: datetime) -> None:
        if self._renewed_at is None:
            self._renewed_at = now
            return
        if now - self._renewed_at < self.lease / 3:
            return
        self._renewed_at = now
        held = renew_leases(self.db, self.held_ids(), self.owner, until=now + self.lease)
        for domain in list(self._held):
            rows = self._held[domain]
            kept = deque(r for r in rows if r.id in held)
            self._held_count -= len(rows) - len(kept)
            self._held[domain] = kept
            if not kept:
                del self._held[domain]
                self._order.remove(domain)

    def _give_up_slow_domains(self, now: datetime) -> None:
        """Leave rows whose domain waits longer than ``max_wait`` to a later run."""
        notes = []
        for domain in list(self._held):
            wait = self.pacer.wait(domain, now)
            if wait > self.max_wait:
                rows = self._held.pop(domain)
                self._order.remove(domain)
                self._held_count -= len(rows)
                self._excluded.add(domain)
                release_rows(self.db, [r.id for r in rows], self.owner)
                until = now + timedelta(seconds=wait)
                notes.append(f"{domain} (slowed down until {format_local(until)})")
        if notes:
            self.notes.append("recipients at " + ", ".join(notes) + " stay queued for a later run")

    def _check_status(self, now: datetime) -> None:
        """Notice a pause while idle (busy runs notice it at every commit)."""
        if self._status_checked_at is not None and now - self._status_checked_at < timedelta(
            seconds=1
        ):
            return
        self._status_checked_at = now
        with connect_for_reading(self.db) as conn:
            status = conn.execute(
                select(campaigns.c.status).where(campaigns.c.id == self.campaign_id)
            ).scalar_one_or_none()
        if status != "sending":
            self.external_status = status or "deleted"

    def context_for(self, row: LedgerRow) -> Mapping[str, Any]:
        return self._contexts.pop(row.contact_id, None) or {
            "id": row.contact_id,
            "email": row.email,
        }

    # -- after each commit -----------------------------------------------------------------

    def after_commit(
        self, status: str | None, slowed: Mapping[str, datetime], finals: int, bounces: int
    ) -> None:
        now = self.clock.now()
        if status != "sending":
            self.external_status = status or "deleted"
        for key, until in slowed.items():
            if key == self.relay:
                self.notes.append(f"next try after {format_local(until)}")
            else:
                self.pacer.slow_down(key, until, now)
        if not self.safety.enabled or self._safety_done:
            return
        self._finals_unchecked += finals
        if bounces or self._finals_unchecked >= 50:
            self._finals_unchecked = 0
            total, bounced = count_bounce_sample(self.db, self.campaign_id)
            if self.safety.tripped(total, bounced):
                self.stop(self.safety.describe(min(total, self.safety.first), bounced))
            if total >= self.safety.first:
                self._safety_done = True

    def relay_busy(self, reply: str) -> list[LedgerOp]:
        """The relay refused a session (4xx greeting, 421 at MAIL, dropped): stop this run,
        leave everyone queued, and slow the relay down once for every process."""
        if self._relay_busy:
            return []
        self._relay_busy = True
        self.halt(
            f"the relay {self.target.where} is busy ({reply}); nobody was marked failed and "
            "the remaining recipients stay queued"
        )
        return [SlowDown(self.relay, reply)]

    def count(self, kind: str) -> None:
        self.outcomes[kind] += 1
        if self.progress is not None:
            self.progress.update(1)
            o = self.outcomes
            self.progress.set_postfix(
                sent=o["sent"],
                deferred=o["defer"],
                failed=o["bounce"] + o["fail"],
                unknown=o["unknown"],
                refresh=False,
            )


@dataclass(frozen=True)
class Marked:
    """A ``sending`` mark, once its group is committed: ``taken`` says whether it took (False:
    our lease on the row ran out and another worker has it; an exception: the commit failed);
    ``cleared`` whether the message may be sent: taken, and the run not stopping (paused or
    stopped in that commit). ``cleared`` never raises."""

    taken: asyncio.Future[bool]
    cleared: asyncio.Future[bool]

    def settle(self, taken: bool | BaseException, cleared: bool) -> None:
        if not self.taken.done():
            if isinstance(taken, BaseException):
                self.taken.set_exception(taken)
            else:
                self.taken.set_result(taken)
        if not self.cleared.done():
            self.cleared.set_result(cleared)


class LedgerWriter:
    """Commits the workers' ledger changes in groups, in submission order."""

    def __init__(self, run: Run) -> None:
        self._run = run
        self._ops: list[LedgerOp] = []
        self._waiters: list[tuple[int, Marked]] = []
        self._wake = asyncio.Event()
        self._closed = False
        self._on_loop = run.db.dialect.name == "sqlite"

    def submit(self, *ops: LedgerOp) -> None:
        """Queue ops for the next commit without waiting for it."""
        self._ops.extend(ops)
        self._wake.set()

    def mark(self, outgoing: Outgoing) -> Marked:
        """Queue ``outgoing``'s row as ``sending`` for the next commit (see ``Marked``)."""
        loop = asyncio.get_running_loop()
        marked = Marked(loop.create_future(), loop.create_future())
        self._waiters.append((len(self._ops), marked))
        self.submit(MarkSending(outgoing.row.id, outgoing.message_id))
        return marked

    async def run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            # Let every worker that is ready add its ops to this commit: yield to the event
            # loop while each pass brings more. Bounded, because a worker that submitted a mark
            # waits for this commit before it submits anything else; fewer, larger commits
            # are what keeps the ledger's cost per message low.
            count = -1
            for _ in range(_GATHER_PASSES):
                if len(self._ops) == count:
                    break
                count = len(self._ops)
                await asyncio.sleep(0)
            await self.flush()
            if self._closed and not self._ops:
                return

    def close(self) -> None:
        self._closed = True
        self._wake.set()

    async def flush(self) -> None:
        ops, waiters = self._ops, self._waiters
        if not ops:
            return
        self._ops, self._waiters = [], []
        run = self._run
        try:
            commit = functools.partial(
                apply_ledger_ops,
                run.db,
                run.campaign_id,
                run.owner,
                ops,
                now=run.clock.now(),
                lease=run.lease,
            )
            applied = None
            if self._on_loop:
                # A SQLite commit is ~0.5 ms of CPU, mostly Python wherever it runs, while
                # handing it to a thread costs a wake-up and the GIL going back and forth
                # (measured: 5 % less CPU per message on the loop). But a commit that would
                # wait for another sender's write lock goes to the thread, where the wait
                # does not stop the event loop.
                with contextlib.suppress(WriteLockBusy):
                    applied = commit(wait=False)
            if applied is None:
                # In a thread: the event loop keeps rendering, signing and talking SMTP while
                # the database commits or waits (PostgreSQL's round trips, SQLite's lock).
                applied = await asyncio.to_thread(commit)
        except BaseException as exc:
            run.fail(exc)
            for _, marked in waiters:
                marked.settle(exc, False)
            raise
        finals = bounces = 0
        for op in ops:
            if isinstance(op, RecordOutcome) and op.state in ("sent", "failed"):
                finals += 1
                bounces += op.suppress == "hard_bounce"
        # Before the waiting workers resume, so that they see a pause or a stop at once.
        run.after_commit(applied.campaign_status, applied.slowed, finals, bounces)
        for index, marked in waiters:
            taken = applied.accepted[index]
            marked.settle(taken, taken and not run.stopping)


# -- a worker --------------------------------------------------------------------------------


async def work(run: Run) -> None:
    """One worker: one SMTP connection, rows until the dispatcher has none left."""
    connection = SMTPConnection(run.target)
    try:
        while True:
            row = await run.next_row()
            if row is None:
                return
            try:
                fresh = await _attempt(run, connection, row)
            finally:
                run.pacer.release(row.recipient_domain)
            if fresh:
                await connection.close()
                connection = SMTPConnection(run.target)
    except BaseException as exc:
        run.fail(exc)
    finally:
        await connection.close()


async def _attempt(run: Run, connection: SMTPConnection, row: LedgerRow) -> bool:
    """Send one row; True when the connection should be replaced."""
    writer = run.writer
    assert writer is not None
    try:
        outgoing = run.factory.build(row, run.context_for(row))
    except (TemplateError, AddressError) as exc:
        # The contact changed since the preflight: this recipient fails alone, visibly.
        writer.submit(
            RecordOutcome(row, None, "failed", None, f"the message could not be built: {exc}")
        )
        run.count("fail")
        return False
    busy = await connection.ensure_open()
    if busy is not None:
        run.give_back(row)
        writer.submit(*run.relay_busy(busy.reply))
        return True
    if run.stopping:
        run.give_back(row)
        return False
    marked = writer.mark(outgoing)
    try:
        outcome = await connection.send(
            outgoing.envelope_from,
            row.email,
            outgoing.data,
            before_end=marked.cleared,
            crlf=True,
        )
    except SMTPDeliveryError:
        if await marked.taken:
            writer.submit(RevertSending(row.id, outgoing.message_id, row.state))
        raise
    # Ops about this row go after its mark's commit: a group holds one op per row.
    if not await marked.taken:
        # Our lease on it ran out and another worker has it now. Whatever the server said,
        # nothing of ours was delivered: the dot needed the mark.
        return outcome.kind == "withheld" or outcome.closes_connection
    if outcome.kind == "withheld":
        writer.submit(RevertSending(row.id, outgoing.message_id, row.state))
        return True
    run.attempted += 1
    writer.submit(*decide(run, outgoing, outcome))
    return outcome.closes_connection or outcome.kind in ("defer", "unknown")


def decide(run: Run, outgoing: Outgoing, outcome: Outcome) -> list[LedgerOp]:
    """The ledger ops for one SMTP outcome (see the reply table in the README)."""
    row, mid = outgoing.row, outgoing.message_id
    detail = {"code": outcome.code, "reply": outcome.reply, "source": "smtp"}
    kind = outcome.kind
    if kind == "sent":
        run.count("sent")
        return [
            RecordOutcome(row, mid, "sent", outcome.code, outcome.reply, event=("sent", detail))
        ]
    if kind == "bounce":
        run.count("bounce")
        return [
            RecordOutcome(
                row,
                mid,
                "failed",
                outcome.code,
                outcome.reply,
                event=("bounce", {**detail, "kind": "hard"}),
                suppress="hard_bounce",
            )
        ]
    if kind == "fail":
        run.count("fail")
        return [
            RecordOutcome(
                row,
                mid,
                "failed",
                outcome.code,
                outcome.reply,
                event=("bounce", {**detail, "kind": "rejected"}),
            )
        ]
    if kind == "unknown":
        run.count("unknown")
        return [RecordOutcome(row, mid, "unknown", outcome.code, outcome.reply)]
    if kind == "stop":
        run.stop(
            f"the server refused the sender ({outcome.reply}); the campaign is paused and "
            "nobody was suppressed. Check SPF/DKIM/DMARC alignment and the SMTP credentials, "
            "then resume with `mailkit campaign send`"
        )
        return [RevertSending(row.id, mid, row.state)]
    # defer
    if outcome.stage == "connect" or (outcome.stage == "mail" and outcome.code == 421):
        # The relay refused the session before anything of this message: not an attempt.
        return [RevertSending(row.id, mid, row.state), *run.relay_busy(outcome.reply)]
    run.count("defer")
    now = run.clock.now()
    enhanced = outcome.enhanced or ""
    pushed_back = outcome.code == 421 or enhanced.startswith("4.7.")
    slow = row.recipient_domain if pushed_back else None
    attempts = row.attempts + 1
    retry_at = now + retry_delay(attempts)
    if retry_at - run.started_at > MAX_LIFETIME:
        return [
            RecordOutcome(
                row,
                mid,
                "failed",
                outcome.code,
                f"gave up after {attempts} attempts over {MAX_LIFETIME.days} days: {outcome.reply}",
                event=("bounce", {**detail, "kind": "expired"}),
                slow_domain=slow,
            )
        ]
    return [
        RecordOutcome(
            row,
            mid,
            "deferred",
            outcome.code,
            outcome.reply,
            next_attempt_at=retry_at,
            slow_domain=slow,
        )
    ]
