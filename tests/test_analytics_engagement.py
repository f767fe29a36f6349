"""The engagement summary: kept true by triggers, backfilled by the migration, same metrics.

Events are written every way mailkit and its users write them (``record_events`` in batches,
``save_event``, a plain ``INSERT``, the tracking writer's after-the-fact scanner ``UPDATE``, a
``DELETE``), then the summary is compared with a recount from scratch, in SQL and in pandas;
the metrics and the timeline are compared with the event-scanning queries they replaced
(kept below as the reference).
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import pandas as pd
import pytest
from sqlalchemy import (
    ColumnElement,
    Engine,
    Integer,
    Subquery,
    and_,
    case,
    cast,
    delete,
    func,
    insert,
    select,
    update,
)

import mailkit
from mailkit.analytics import load_metrics, load_timeline, record_events, save_event
from mailkit.analytics.metrics import COUNT_COLUMNS
from mailkit.storage import migrate_db, open_db
from mailkit.storage.engagement import rebuild_engagement, select_engagement_rows
from mailkit.storage.engine import create_db_engine
from mailkit.storage.schema import (
    PENDING_STATES,
    campaigns,
    contacts,
    engagement,
    events,
    links,
    messages,
    templates,
)

# A start with a fraction of a second, so that period edges fall inside a second.
START = datetime(2026, 4, 1, 9, 0, 0, 250_000, tzinfo=UTC)
PEOPLE = [f"p{i}@example.jp" for i in range(7)]
SUMMARY = [
    "campaign_id",
    "message_id",
    "opens",
    "machine_opens",
    "clicks",
    "machine_clicks",
    "bounces",
    "soft_bounces",
    "unsubscribes",
    "complaints",
    "first_open_at",
    "first_click_at",
]


def at(seconds: float) -> datetime:
    return START + timedelta(seconds=seconds)


# --- the world: a campaign with a mixed ledger, written at schema 0004 or at head -------------


def build_ledger(db: Engine) -> tuple[int, list[int], list[int]]:
    """A finished campaign of seven recipients (accepted, refused, expired, still queued).

    Written with Core inserts of columns that exist since migration 0004, so that the same
    world can be built before the summary exists. Returns campaign id, ledger ids, link ids.
    """
    with db.begin() as conn:
        tpl = conn.execute(
            insert(templates)
            .values(name="t", subject="s", html="<p>x</p>", version=1)
            .returning(templates.c.id)
        ).scalar_one()
        cid = conn.execute(
            insert(campaigns)
            .values(name="c", template_id=tpl, template_version=1, segment="", status="finished",
                    from_addr="news@shop.example.jp", started_at=START)
            .returning(campaigns.c.id)
        ).scalar_one()  # fmt: skip
        link_ids = [
            conn.execute(
                insert(links)
                .values(campaign_id=cid, url=f"https://shop.example.jp/{p}", position=p)
                .returning(links.c.id)
            ).scalar_one()
            for p in (1, 2)
        ]
        states = [
            ("sent", 250),
            ("sent", 250),
            ("sent", 250),
            ("failed", 550),  # refused at RCPT
            ("failed", 421),  # retries ran out: expired, with a bounce event below
            ("sent", 250),
            ("queued", None),
        ]
        rows = []
        for email, (state, code) in zip(PEOPLE, states, strict=True):
            contact = conn.execute(
                insert(contacts).values(email=email, domain="example.jp").returning(contacts.c.id)
            ).scalar_one()
            rows.append(
                conn.execute(
                    insert(messages)
                    .values(campaign_id=cid, contact_id=contact, email=email, state=state,
                            smtp_code=code, sent_at=START if state == "sent" else None,
                            domain="example.jp", attempts=1)
                    .returning(messages.c.id)
                ).scalar_one()
            )  # fmt: skip
    return cid, rows, link_ids


def write_workload(db: Engine, cid: int, rows: list[int], link_ids: list[int]) -> None:
    """Every kind of event, written every way events get written, including repeats."""
    r = rows

    def ev(i: int, kind: str, seconds: float, **extra: Any) -> dict[str, Any]:
        return {"message_id": r[i], "type": kind, "occurred_at": at(seconds), **extra}

    # A batch (one statement: several rows of the same recipient at once).
    record_events(
        db,
        [
            ev(0, "sent", 0),
            ev(0, "open", 10),
            ev(0, "open", 3600),  # exactly on the edge of period 1
            ev(0, "open", 3599.9),  # a tenth of a second before it
            ev(0, "click", 3600 - 0.3, link_id=link_ids[0]),  # in the edge's second, before it
            ev(0, "click", 5, link_id=link_ids[1], machine=True),
            ev(1, "open", 2, machine=True),
            ev(1, "open", 3, machine=True),
            ev(1, "open", 4, machine=True),  # an image proxy, three times: machine only
            ev(2, "click", 3599.5, link_id=link_ids[1]),  # a click with images blocked
            ev(2, "complaint", 7200),
            ev(3, "bounce", 0, detail={"kind": "rejected"}),
            ev(4, "bounce", 600, detail={"kind": "expired"}),
            ev(4, "soft_bounce", 300),
            ev(5, "soft_bounce", 100),
            ev(5, "open", -300),  # before the start: period 0
            ev(5, "suppressed", 100),  # not engagement
        ],
    )
    # One event at a time, as the tracking server and the bounce processor do.
    save_event(db, cid, r[0], "unsubscribe", occurred_at=at(7300))
    save_event(db, cid, r[2], "open", occurred_at=at(86_400 * 2 + 1))
    save_event(db, cid, r[3], "bounce", occurred_at=at(60), detail={"kind": "hard"})  # again
    # A user's own INSERT, bypassing the library.
    with db.begin() as conn:
        conn.execute(
            insert(events).values(
                campaign_id=cid, message_id=r[1], contact_id=None, type="click",
                occurred_at=at(30), link_id=link_ids[0], machine=False,
            )
        )  # fmt: skip
        conn.execute(
            insert(events).values(
                campaign_id=cid, message_id=r[5], type="open", occurred_at=at(90), machine=False
            )
        )
    # The tracking writer flags a link scanner after the fact: r1's click was a machine.
    with db.begin() as conn:
        conn.execute(
            update(events)
            .where(events.c.message_id == r[1], events.c.type == "click")
            .values(machine=True)
        )
    # A clean-up deletes r5's human open at 90 s: its first open is the earlier one again,
    # and a deleted lone event leaves no summary row behind.
    with db.begin() as conn:
        conn.execute(delete(events).where(events.c.message_id == r[5], events.c.type == "open",
                                          events.c.occurred_at == at(90)))  # fmt: skip
        conn.execute(insert(events).values(campaign_id=cid, message_id=r[6], type="complaint",
                                           occurred_at=at(50), machine=False))  # fmt: skip
        conn.execute(delete(events).where(events.c.message_id == r[6]))


# --- recounts from scratch ------------------------------------------------------------------


def read_summary(db: Engine) -> pd.DataFrame:
    with db.connect() as conn:
        frame = pd.DataFrame(conn.execute(select(engagement)).all(), columns=SUMMARY)
    return frame.sort_values(["campaign_id", "message_id"]).reset_index(drop=True)


def recount_in_sql(db: Engine) -> pd.DataFrame:
    with db.connect() as conn:
        frame = pd.DataFrame(conn.execute(select_engagement_rows()).all(), columns=SUMMARY)
    return frame.sort_values(["campaign_id", "message_id"]).reset_index(drop=True)


def recount_in_pandas(db: Engine) -> pd.DataFrame:
    """The summary's definition applied to the raw events in Python, independent of SQL."""
    with db.connect() as conn:
        ev = pd.DataFrame(
            conn.execute(
                select(events.c.campaign_id, events.c.message_id, events.c.type,
                       events.c.machine, events.c.occurred_at)
            ).all(),
            columns=["campaign_id", "message_id", "type", "machine", "occurred_at"],
        )  # fmt: skip
    kinds = {"bounce", "soft_bounce", "open", "click", "unsubscribe", "complaint"}
    ev = ev[ev["type"].isin(kinds) & ev["campaign_id"].notna() & ev["message_id"].notna()]
    out = []
    for (campaign_id, message_id), g in ev.groupby(["campaign_id", "message_id"]):
        human, machine = ~g["machine"].astype(bool), g["machine"].astype(bool)
        opens_or_clicks = g[g["type"].isin(["open", "click"]) & human]["occurred_at"]
        clicks = g[(g["type"] == "click") & human]["occurred_at"]
        out.append(
            {
                "campaign_id": int(campaign_id),
                "message_id": int(message_id),
                "opens": int(((g["type"] == "open") & human).sum()),
                "machine_opens": int(((g["type"] == "open") & machine).sum()),
                "clicks": int(((g["type"] == "click") & human).sum()),
                "machine_clicks": int(((g["type"] == "click") & machine).sum()),
                "bounces": int((g["type"] == "bounce").sum()),
                "soft_bounces": int((g["type"] == "soft_bounce").sum()),
                "unsubscribes": int((g["type"] == "unsubscribe").sum()),
                "complaints": int((g["type"] == "complaint").sum()),
                "first_open_at": opens_or_clicks.min() if len(opens_or_clicks) else None,
                "first_click_at": clicks.min() if len(clicks) else None,
            }
        )
    frame = pd.DataFrame(out, columns=SUMMARY)
    return frame.sort_values(["campaign_id", "message_id"]).reset_index(drop=True)


def assert_same_summary(actual: pd.DataFrame, expected: pd.DataFrame) -> None:
    assert len(actual) == len(expected)
    for name in SUMMARY:
        left, right = list(actual[name]), list(expected[name])
        if name.startswith("first_"):
            left = [None if pd.isna(v) else pd.Timestamp(v) for v in left]
            right = [None if pd.isna(v) else pd.Timestamp(v) for v in right]
        else:
            left, right = [int(v) for v in left], [int(v) for v in right]
        assert left == right, name


# --- the queries the summary replaced (the reference) ---------------------------------------


def _flag(condition: ColumnElement[bool]) -> ColumnElement[int]:
    return func.max(case((condition, 1), else_=0))


def reference_flags(campaign_ids: Sequence[int]) -> Subquery:
    e = events.c
    human, machine = e.machine.is_(False), e.machine.is_(True)
    kinds = ("bounce", "soft_bounce", "open", "click", "unsubscribe", "complaint")
    return (
        select(
            e.message_id.label("message_id"),
            _flag(e.type == "bounce").label("bounced"),
            _flag(e.type == "soft_bounce").label("soft_bounced"),
            _flag(and_(e.type.in_(("open", "click")), human)).label("opened"),
            _flag(and_(e.type == "open", machine)).label("machine_opened"),
            _flag(and_(e.type == "click", human)).label("clicked"),
            _flag(and_(e.type == "click", machine)).label("machine_clicked"),
            _flag(e.type == "unsubscribe").label("unsubscribed"),
            _flag(e.type == "complaint").label("complained"),
        )
        .where(e.campaign_id.in_(list(campaign_ids)), e.message_id.is_not(None), e.type.in_(kinds))
        .group_by(e.message_id)
        .subquery("flags")
    )


def reference_counts(db: Engine, campaign_id: int) -> dict[str, int]:
    flags = reference_flags([campaign_id])
    m, f = messages.c, flags.c
    bounced = func.coalesce(f.bounced, 0) == 1
    rejected = and_(m.state == "failed", m.smtp_code >= 500)
    expired = and_(m.state == "failed", func.coalesce(m.smtp_code, 0) < 500, bounced)

    def total(condition: ColumnElement[bool]) -> ColumnElement[int]:
        return func.coalesce(func.sum(case((condition, 1), else_=0)), 0)

    opened, clicked = f.opened == 1, f.clicked == 1
    query = (
        select(
            func.count().label("recipients"),
            total(m.state.in_(PENDING_STATES)).label("pending"),
            total(m.state == "sent").label("accepted"),
            total(rejected).label("rejected"),
            total(expired).label("expired"),
            total(and_(bounced, (m.state == "sent") | rejected | expired)).label("hard_bounces"),
            total(and_(f.soft_bounced == 1, ~bounced)).label("soft_bounces"),
            total(and_(m.state == "sent", ~bounced)).label("delivered"),
            total(opened).label("openers"),
            total(and_(f.machine_opened == 1, ~opened)).label("machine_openers"),
            total(clicked).label("clickers"),
            total(and_(f.machine_clicked == 1, ~clicked)).label("machine_clickers"),
            total(f.unsubscribed == 1).label("unsubscribes"),
            total(f.complained == 1).label("complaints"),
        )
        .select_from(messages.outerjoin(flags, f.message_id == m.id))
        .where(m.campaign_id == campaign_id)
    )
    with db.connect() as conn:
        row = conn.execute(query).one()._asdict()
    counts = {k: int(v) for k, v in row.items()}
    counts["sent"] = counts["accepted"] + counts["rejected"] + counts["expired"]
    counts["all_openers"] = counts["openers"] + counts["machine_openers"]
    return counts


def reference_timeline(db: Engine, campaign_id: int, size: int) -> pd.DataFrame:
    """Per-event periods computed row by row, first opens grouped from the events."""
    e = events.c
    human = e.machine.is_(False)
    dialect = db.dialect.name

    def bucket(column: Any) -> ColumnElement[int]:
        if dialect == "sqlite":
            seconds = cast(func.strftime("%s", column), Integer) - int(START.timestamp())
            periods: ColumnElement[Any] = cast(seconds / size, Integer)
        else:
            seconds = func.extract("epoch", column) - START.timestamp()
            periods = cast(func.floor(seconds / size), Integer)
        return case((periods < 0, 0), else_=periods)

    def count(condition: ColumnElement[bool]) -> ColumnElement[int]:
        return func.coalesce(func.sum(case((condition, 1), else_=0)), 0)

    since = bucket(e.occurred_at).label("since")
    per_event = (
        select(
            since,
            count(and_(e.type == "open", human)).label("opens"),
            count(and_(e.type == "open", e.machine.is_(True))).label("machine_opens"),
            count(and_(e.type == "click", human)).label("clicks"),
            count(and_(e.type == "click", e.machine.is_(True))).label("machine_clicks"),
            count(e.type == "unsubscribe").label("unsubscribes"),
        )
        .where(e.campaign_id == campaign_id, e.type.in_(("open", "click", "unsubscribe")))
        .group_by(since)
    )
    firsts = (
        select(
            func.min(e.occurred_at).label("first_open"),
            func.min(case((e.type == "click", e.occurred_at))).label("first_click"),
        )
        .where(e.campaign_id == campaign_id, e.type.in_(("open", "click")), human)
        .group_by(e.message_id)
        .subquery()
    )
    with db.connect() as conn:
        frame = pd.DataFrame(conn.execute(per_event).all()).set_index("since")
        open_period = bucket(firsts.c.first_open).label("period")
        opened = conn.execute(select(open_period, func.count()).group_by(open_period)).all()
        click_period = bucket(firsts.c.first_click).label("period")
        clicked = conn.execute(
            select(click_period, func.count())
            .where(firsts.c.first_click.is_not(None))
            .group_by(click_period)
        ).all()
    last = int(frame.index.max())
    frame = frame.reindex(range(last + 1)).fillna(0).astype("int64")
    frame["new_openers"] = pd.Series(dict(opened)).reindex(frame.index).fillna(0).astype("int64")
    frame["new_clickers"] = pd.Series(dict(clicked)).reindex(frame.index).fillna(0).astype("int64")
    return frame


# --- the tests ------------------------------------------------------------------------------


def test_the_summary_matches_a_recount_after_a_mixed_workload(db: Engine) -> None:
    cid, rows, link_ids = build_ledger(db)
    write_workload(db, cid, rows, link_ids)
    summary = read_summary(db)
    assert_same_summary(summary, recount_in_sql(db))
    assert_same_summary(summary, recount_in_pandas(db))
    by_row = summary.set_index("message_id")
    assert int(by_row.loc[rows[1], "clicks"]) == 0  # flagged a scanner after the fact
    assert int(by_row.loc[rows[1], "machine_clicks"]) == 1
    assert pd.isna(by_row.loc[rows[1], "first_open_at"])
    assert int(by_row.loc[rows[3], "bounces"]) == 2
    assert int(by_row.loc[rows[5], "opens"]) == 1  # the later one was deleted
    assert pd.Timestamp(by_row.loc[rows[5], "first_open_at"]) == pd.Timestamp(at(-300))
    assert rows[6] not in by_row.index  # its only event was deleted


def test_rebuilding_the_summary_changes_nothing(db: Engine) -> None:
    cid, rows, link_ids = build_ledger(db)
    write_workload(db, cid, rows, link_ids)
    before = read_summary(db)
    assert rebuild_engagement(db, [cid]) == len(before) == 6
    assert_same_summary(read_summary(db), before)
    assert rebuild_engagement(db) == 6
    assert_same_summary(read_summary(db), before)


def test_metrics_are_those_the_event_scan_counted(db: Engine) -> None:
    cid, rows, link_ids = build_ledger(db)
    write_workload(db, cid, rows, link_ids)
    row = load_metrics(db, cid).loc[cid]
    assert {k: int(row[k]) for k in COUNT_COLUMNS} == reference_counts(db, cid)
    # And by hand, so that the reference itself is checked.
    assert int(row["openers"]) == 3  # p0, p2 (a click), p5 (before the start)
    assert int(row["machine_openers"]) == 1  # p1
    assert int(row["hard_bounces"]) == 2  # p3 refused, p4 expired
    assert int(row["expired"]) == 1
    assert int(row["soft_bounces"]) == 1  # p5; p4's soft bounce ended in a bounce
    assert int(row["pending"]) == 1


@pytest.mark.parametrize("unit, size", [("hour", 3600), ("day", 86400)])
def test_the_timeline_is_the_one_counted_event_by_event(db: Engine, unit: str, size: int) -> None:
    cid, rows, link_ids = build_ledger(db)
    write_workload(db, cid, rows, link_ids)
    timeline = load_timeline(db, cid, unit=unit)  # type: ignore[arg-type]
    expected = reference_timeline(db, cid, size)
    columns = list(expected.columns)
    assert timeline[columns].to_dict() == expected[columns].to_dict()
    assert int(timeline["openers"].iloc[-1]) == 3


def test_the_migration_backfills_an_existing_database(db_url: str) -> None:
    """A database at 0004 with events is upgraded; its summary is the recount of its events."""
    engine = create_db_engine(db_url)
    try:
        migrate_db(engine, "0004")
        cid, rows, link_ids = build_ledger(engine)
        write_workload(engine, cid, rows, link_ids)
        counts_before = reference_counts(engine, cid)
    finally:
        engine.dispose()
    upgraded = open_db(db_url)
    try:
        assert_same_summary(read_summary(upgraded), recount_in_pandas(upgraded))
        assert len(read_summary(upgraded)) == 6
        row = load_metrics(upgraded, cid).loc[cid]
        assert {k: int(row[k]) for k in COUNT_COLUMNS} == counts_before
        # And the triggers are live after the upgrade.
        save_event(upgraded, cid, rows[6], "open", occurred_at=at(5))
        assert_same_summary(read_summary(upgraded), recount_in_pandas(upgraded))
    finally:
        upgraded.dispose()


def test_a_real_send_keeps_the_summary_true(db: Engine) -> None:
    """The dispatcher's own ``sent`` events and a refused address, through the real sink."""
    frame = pd.DataFrame([{"email": "x@example.jp"}, {"email": "ghost@example.jp"}])
    mailkit.import_contacts(db, frame)
    mailkit.save_template(db, "t", subject="s", html="<p>x</p>")
    made = mailkit.create_campaign(db, "c", template="t", segment="", from_addr="a@example.jp")
    refused = "550 5.1.1 <ghost@example.jp>: User unknown"
    with mailkit.Sink(rcpt_replies={"ghost@example.jp": refused}) as sink:
        mailkit.send_campaign(db, made.id, sink.url, concurrency=1)
    assert_same_summary(read_summary(db), recount_in_pandas(db))
