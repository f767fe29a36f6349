"""Claims: which rows they take, and that they (and recovery) read about as many rows as they
take, not the whole ledger."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import pytest
from lock_support import read_while_locked
from sqlalchemy import Engine, event, select, update
from test_dispatch_support import addresses, make_campaign

from mailkit.campaigns import snapshot_campaign
from mailkit.dispatch.commits import MarkSending, apply_ledger_ops
from mailkit.dispatch.ledger import (
    claim_rows,
    count_bounce_sample,
    count_states,
    fetch_contact_contexts,
    new_worker_id,
    recover_stale_rows,
)
from mailkit.storage import WriteLockBusy
from mailkit.storage.schema import messages, utcnow


def _ledger_ids(db: Engine, campaign_id: int) -> list[int]:
    with db.connect() as conn:
        query = select(messages.c.id).where(messages.c.campaign_id == campaign_id)
        return sorted(conn.execute(query).scalars())


def test_a_claim_takes_queued_rows_and_due_retries_oldest_first(db: Engine) -> None:
    campaign_id = make_campaign(db, addresses(30))
    snapshot_campaign(db, campaign_id)
    ids = _ledger_ids(db, campaign_id)
    now = utcnow()
    with db.begin() as conn:
        for row_ids, state, retry in (
            (ids[:5], "deferred", now - timedelta(minutes=1)),  # due
            (ids[5:10], "deferred", now + timedelta(minutes=2)),  # not yet
            (ids[10:15], "sent", None),
        ):
            conn.execute(
                update(messages)
                .where(messages.c.id.in_(row_ids))
                .values(state=state, next_attempt_at=retry)
            )
    first = claim_rows(db, campaign_id, new_worker_id(), 8, now=now)
    # The oldest first, whichever their state: the five due retries, then queued rows.
    assert [r.id for r in first] == ids[:5] + ids[15:18]
    assert [r.state for r in first] == ["deferred"] * 5 + ["queued"] * 3
    rest = claim_rows(db, campaign_id, new_worker_id(), 100, now=now)
    assert [r.id for r in rest] == ids[18:]
    assert claim_rows(db, campaign_id, new_worker_id(), 100, now=now) == []
    # Three minutes later the postponed retries are due (and the others still leased).
    later = claim_rows(db, campaign_id, new_worker_id(), 100, now=now + timedelta(minutes=3))
    assert [r.id for r in later] == ids[5:10]
    db.dispose()


def _sqlite_work(db: Engine, action: Callable[[], Any]) -> int:
    """SQLite virtual-machine steps (in hundreds) that ``action`` runs: a count of the rows it
    reads, deterministic, unlike a time."""
    steps = 0

    def tick() -> int:
        nonlocal steps
        steps += 1
        return 0  # go on

    def checkout(dbapi_conn: Any, _record: Any, _proxy: Any) -> None:
        dbapi_conn.set_progress_handler(tick, 100)

    def checkin(dbapi_conn: Any, _record: Any) -> None:
        dbapi_conn.set_progress_handler(None, 0)

    event.listen(db, "checkout", checkout)
    event.listen(db, "checkin", checkin)
    try:
        action()
    finally:
        event.remove(db, "checkout", checkout)
        event.remove(db, "checkin", checkin)
    return steps


def test_a_claim_reads_as_much_in_a_big_ledger_as_in_a_small_one(sqlite_db: Engine) -> None:
    # One query over "queued, or deferred and due" in id order walked past every sent row (or
    # sorted every queued one): the claims of a million-recipient campaign read the ledger.
    db = sqlite_db
    small = make_campaign(db, addresses(100, prefix="small"), name="small")
    snapshot_campaign(db, small)
    baseline = _sqlite_work(db, lambda: claim_rows(db, small, new_worker_id(), 10))

    recipients = 3000
    big = make_campaign(db, addresses(recipients), name="big")
    snapshot_campaign(db, big)
    fresh = _sqlite_work(db, lambda: claim_rows(db, big, new_worker_id(), 10))
    ids = _ledger_ids(db, big)
    with db.begin() as conn:
        conn.execute(
            update(messages)
            .where(messages.c.id.in_(ids[: recipients - 100]))
            .values(state="sent", lease_owner=None, lease_expires_at=None)
        )
    claimed: list[int] = []
    late = _sqlite_work(
        db, lambda: claimed.extend(r.id for r in claim_rows(db, big, new_worker_id(), 10))
    )
    assert claimed == ids[recipients - 100 : recipients - 90]
    # 30 times the rows, not twice the work, whether they are waiting or sent already.
    assert 0 < fresh < 2 * baseline and late < 2 * baseline, (baseline, fresh, late)


def _recovery_work(db: Engine, recipients: int, name: str) -> tuple[int, list[tuple[str, None]]]:
    """The work of recovering a campaign whose rows are sent but for the last hundred, three
    of which a dead worker holds (one in flight); and those three rows afterwards."""
    campaign_id = make_campaign(db, addresses(recipients, prefix=name), name=name)
    snapshot_campaign(db, campaign_id)
    ids = _ledger_ids(db, campaign_id)
    with db.begin() as conn:
        conn.execute(
            update(messages).where(messages.c.id.in_(ids[: recipients - 100])).values(state="sent")
        )
        conn.execute(
            update(messages)
            .where(messages.c.id.in_(ids[-3:]))
            .values(
                lease_owner="elsewhere.invalid:1:dead",
                lease_expires_at=utcnow() - timedelta(minutes=1),
            )
        )
        conn.execute(update(messages).where(messages.c.id == ids[-1]).values(state="sending"))
    recovered: list[int] = []
    work = _sqlite_work(db, lambda: recovered.append(recover_stale_rows(db, campaign_id)))
    assert recovered == [1]
    with db.connect() as conn:
        query = select(messages.c.state, messages.c.lease_owner).where(messages.c.id.in_(ids[-3:]))
        return work, sorted(tuple(row) for row in conn.execute(query))


def test_recovery_reads_no_sent_row(sqlite_db: Engine) -> None:
    # Every run starts with recovery (and a worker runs once per poll): it looked at all of a
    # campaign's rows for leases, although only waiting or in-flight rows can hold one.
    small, small_rows = _recovery_work(sqlite_db, 100, "small")
    big, big_rows = _recovery_work(sqlite_db, 3000, "big")
    assert small_rows == big_rows == [("queued", None), ("queued", None), ("unknown", None)]
    assert 0 < big < 2 * small, (small, big)


def test_the_dispatchers_reads_do_not_wait_for_another_writer(sqlite_db: Engine) -> None:
    # Another sender (here a plain sqlite3 connection) holds the write lock, as it does during
    # each of its commits. The counts and contact data a sender reads between its own commits
    # must not queue behind it: they read the last committed state instead.
    db = sqlite_db
    campaign_id = make_campaign(db, addresses(20))
    snapshot_campaign(db, campaign_id)
    [row] = claim_rows(db, campaign_id, new_worker_id(), 1)
    states, sample, contexts = read_while_locked(
        db,
        lambda: (
            count_states(db, campaign_id),
            count_bounce_sample(db, campaign_id),
            fetch_contact_contexts(db, [row.contact_id]),
        ),
        ("UPDATE messages SET state = 'sent' WHERE campaign_id = ?", (campaign_id,)),
    )
    assert states["queued"] == 20 and states["sent"] == 0  # the uncommitted update is unseen
    assert sample == (0, 0)
    assert contexts[row.contact_id]["email"] == row.email
    db.dispose()


def test_a_commit_that_may_not_wait_applies_nothing_while_another_sender_writes(
    sqlite_db: Engine,
) -> None:
    campaign_id = make_campaign(sqlite_db, addresses(3))
    snapshot_campaign(sqlite_db, campaign_id)
    owner = new_worker_id()
    rows = claim_rows(sqlite_db, campaign_id, owner, 3, now=utcnow())
    marks = [MarkSending(row.id, f"<{row.id}@example.jp>") for row in rows]
    other = sqlite3.connect(str(sqlite_db.url.database), isolation_level=None)
    other.execute("BEGIN IMMEDIATE")
    try:
        with pytest.raises(WriteLockBusy):
            apply_ledger_ops(sqlite_db, campaign_id, owner, marks, wait=False)
    finally:
        other.execute("ROLLBACK")
        other.close()
    assert count_states(sqlite_db, campaign_id)["queued"] == 3  # nothing applied
    applied = apply_ledger_ops(sqlite_db, campaign_id, owner, marks, wait=False)
    assert applied.accepted == (True, True, True)
    assert count_states(sqlite_db, campaign_id)["sending"] == 3
    sqlite_db.dispose()
