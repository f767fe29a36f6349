"""Campaign metrics and breakdowns, every figure checked against a hand count.

The data is real: ten contacts are imported, a campaign is really sent to the embedded SMTP
sink (which refuses one address), and engagement events are written through the library's own
event API, at known offsets from the campaign's start.
"""

from __future__ import annotations

import math
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta

import pandas as pd
import pytest
from sqlalchemy import Engine, insert, select, text

import mailkit
from mailkit.analytics import (
    build_report,
    load_campaign_metrics,
    load_link_metrics,
    load_metric_cube,
    load_metrics,
    load_metrics_by_attribute,
    load_metrics_by_domain,
    load_metrics_by_segment,
    load_metrics_by_variant,
    load_timeline,
    record_events,
    save_event,
    summarise_cube,
)
from mailkit.errors import NotFoundError
from mailkit.storage import open_db
from mailkit.storage.schema import events, links, messages

# (local part @ domain, prefecture or None, gender)
PEOPLE = {
    "a": ("a@example.jp", "東京都", "F"),
    "b": ("b@docomo.ne.jp", "東京都", "M"),
    "c": ("c@ezweb.ne.jp", "大阪府", "F"),
    "d": ("d@au.com", "大阪府", "M"),
    "e": ("e@softbank.ne.jp", "東京都", "F"),
    "f": ("f@i.softbank.jp", "北海道", "F"),
    "g": ("g@example.co.jp", "東京都", "M"),
    "h": ("h@example.jp", "大阪府", "F"),
    "i": ("i@example.jp", None, "F"),
    "ghost": ("ghost@example.jp", "東京都", "M"),
}
REFUSED = "550 5.1.1 <ghost@example.jp>: Recipient address rejected: User unknown"
FROM = "ショップ <news@shop.example.jp>"


@dataclass(frozen=True)
class World:
    db: Engine
    campaign_id: int
    started_at: datetime
    rows: dict[str, int]  # person key → ledger row id
    link_ids: dict[int, int]  # position → link id


def import_people(db: Engine) -> None:
    frame = pd.DataFrame(
        [
            {"email": email, "氏名": f"{key}さん", "prefecture": pref or "", "gender": gender}
            for key, (email, pref, gender) in PEOPLE.items()
        ]
    )
    report = mailkit.import_contacts(db, frame)
    assert report.added == len(PEOPLE) and not report.rejected
    mailkit.save_template(
        db, "spring", subject="{{ name }}様へ 春のご案内", html="<p>{{ name }}</p>"
    )


def send_to_sink(db: Engine, segment: str = "") -> int:
    campaign = mailkit.create_campaign(
        db, f"春 {uuid.uuid4().hex[:6]}", template="spring", segment=segment, from_addr=FROM
    )
    with mailkit.Sink(rcpt_replies={"ghost@example.jp": REFUSED}) as sink:
        result = mailkit.send_campaign(db, campaign.id, sink.url, concurrency=2)
    assert result.status == "finished"
    return campaign.id


def ledger_rows(db: Engine, campaign_id: int) -> dict[str, int]:
    with db.connect() as conn:
        found = dict(
            conn.execute(
                select(messages.c.email, messages.c.id).where(messages.c.campaign_id == campaign_id)
            ).all()
        )
    return {key: found[email] for key, (email, _, _) in PEOPLE.items() if email in found}


def build_world(db: Engine) -> World:
    """Import, send for real, then write the engagement below (the hand counts' source)."""
    import_people(db)
    campaign_id = send_to_sink(db)
    started = mailkit.load_campaign(db, campaign_id).started_at
    assert started is not None
    rows = ledger_rows(db, campaign_id)
    with db.begin() as conn:
        link_ids = {
            pos: conn.execute(
                insert(links)
                .values(campaign_id=campaign_id, url=url, position=pos)
                .returning(links.c.id)
            ).scalar_one()
            for pos, url in ((1, "https://shop.example.jp/spring"), (2, "https://shop.example.jp/"))
        }

    def at(minutes: float) -> datetime:
        return started + timedelta(minutes=minutes)

    def ev(key: str, kind: str, minutes: float, **extra: object) -> dict[str, object]:
        return {"message_id": rows[key], "type": kind, "occurred_at": at(minutes), **extra}

    record_events(
        db,
        [
            ev("a", "open", 10),
            ev("a", "open", 180),  # a second open: still one opener
            ev("a", "click", 185, link_id=link_ids[1]),
            ev("a", "click", 26 * 60 + 5, link_id=link_ids[1]),
            ev("b", "open", 2, machine=True),  # an image proxy only
            ev("c", "open", 1, machine=True),
            ev("c", "open", 120),  # ... and then a human
            ev("d", "click", 300, link_id=link_ids[2]),  # a click with images blocked
            ev("e", "click", 1, link_id=link_ids[1], machine=True),  # a link scanner
            ev("e", "click", 1, link_id=link_ids[2], machine=True),
            ev("f", "bounce", 60, detail={"kind": "hard"}),  # a DSN after acceptance
            ev("f", "bounce", 61, detail={"kind": "hard"}),  # reported twice: one bounce
            ev("g", "open", 90),
            ev("g", "unsubscribe", 100),
            ev("h", "complaint", 240),
            ev("i", "soft_bounce", 30, detail={"kind": "delayed"}),
        ],
    )
    return World(db, campaign_id, started, rows, link_ids)


@pytest.fixture(
    scope="module", params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]
)
def world(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[World]:
    """One real send per backend, shared by the read-only tests of this module."""
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path_factory.mktemp('analytics')}/mailkit.db"
        schema = None
    else:
        admin: Engine = request.getfixturevalue("pg_admin")
        schema = f"mk_{uuid.uuid4().hex[:12]}"
        with admin.connect() as conn:
            conn.execute(text(f'CREATE SCHEMA "{schema}"'))
        base = admin.url.render_as_string(hide_password=False)
        url = f"{base}?options=-csearch_path%3D{schema}"
    db = open_db(url)
    try:
        yield build_world(db)
    finally:
        db.dispose()
        if schema is not None:
            with admin.connect() as conn:
                conn.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))


# --- the campaign's metrics ---------------------------------------------------------------


def test_campaign_metrics_match_the_hand_count(world: World) -> None:
    row = load_metrics(world.db, world.campaign_id).loc[world.campaign_id]
    expected = {
        "recipients": 10,
        "pending": 0,
        "accepted": 9,
        "rejected": 1,  # ghost, 550 at RCPT
        "expired": 0,
        "sent": 10,
        "hard_bounces": 2,  # ghost + f's DSN (reported twice)
        "soft_bounces": 1,  # i
        "delivered": 8,
        "openers": 4,  # a, c (human after machine), d (click implies open), g
        "machine_openers": 1,  # b only; c counts as human
        "all_openers": 5,
        "clickers": 2,  # a, d
        "machine_clickers": 1,  # e, the scanner
        "unsubscribes": 1,
        "complaints": 1,
    }
    assert {k: int(row[k]) for k in expected} == expected
    assert row["deliverability"] == pytest.approx(80.0)  # (1 − 2/10) × 100
    assert row["open_rate"] == pytest.approx(50.0)  # 4 / 8
    assert row["machine_open_rate"] == pytest.approx(12.5)
    assert row["click_rate"] == pytest.approx(25.0)  # 2 / 8
    assert row["click_to_open_rate"] == pytest.approx(50.0)  # 2 / 4
    assert row["unsubscribe_rate"] == pytest.approx(12.5)
    assert row["complaint_rate"] == pytest.approx(12.5)
    assert row["note"] is None


def test_delivery_report_uses_the_same_counts(world: World) -> None:
    report = build_report(world.db, world.campaign_id)
    assert (report.sent, report.accepted, report.rejected) == (10, 9, 1)
    assert (report.bounced, report.delivered, report.expired) == (2, 8, 0)
    assert report.deliverability == 80.0


def test_campaign_frame_lists_every_campaign_with_name_and_start(world: World) -> None:
    frame = load_campaign_metrics(world.db)
    assert world.campaign_id in frame.index
    row = frame.loc[world.campaign_id]
    assert row["status"] == "finished" and row["name"].startswith("春")
    assert row["started_at"] == pd.Timestamp(world.started_at)
    with pytest.raises(NotFoundError):
        load_campaign_metrics(world.db, [world.campaign_id, 999])


# --- breakdowns ---------------------------------------------------------------------------


def test_by_domain_groups_the_carriers(world: World) -> None:
    frame = load_metrics_by_domain(world.db, world.campaign_id)
    counts = frame[["recipients", "delivered", "openers", "clickers"]].astype(int)
    assert counts.to_dict("index") == {
        "example.jp": {"recipients": 4, "delivered": 3, "openers": 1, "clickers": 1},
        "au": {"recipients": 2, "delivered": 2, "openers": 2, "clickers": 1},  # ezweb + au.com
        "SoftBank": {"recipients": 2, "delivered": 1, "openers": 0, "clickers": 0},
        "docomo": {"recipients": 1, "delivered": 1, "openers": 0, "clickers": 0},
        "example.co.jp": {"recipients": 1, "delivered": 1, "openers": 1, "clickers": 0},
    }
    assert list(frame.index) == ["example.jp", "SoftBank", "au", "docomo", "example.co.jp"]
    assert frame.loc["au", "open_rate"] == pytest.approx(100.0)
    assert frame.loc["SoftBank", "deliverability"] == pytest.approx(50.0)
    assert int(frame.loc["docomo", "machine_openers"]) == 1

    raw = load_metrics_by_domain(world.db, world.campaign_id, group_carriers=False, top=2)
    assert list(raw.index) == ["example.jp", "au.com", "(other)"]
    assert int(raw.loc["(other)", "recipients"]) == 5
    assert int(raw.loc["(other)", "openers"]) == 2  # c (ezweb) and g
    assert raw.loc["(other)", "open_rate"] == pytest.approx(2 / 4 * 100)  # f bounced


def test_by_attribute_with_a_group_for_missing_values(world: World) -> None:
    frame = load_metrics_by_attribute(world.db, world.campaign_id, "prefecture")
    assert frame.index.name == "prefecture"
    assert frame["recipients"].astype(int).to_dict() == {
        "東京都": 5,
        "大阪府": 3,
        "(none)": 1,
        "北海道": 1,
    }
    tokyo = frame.loc["東京都"]
    assert (int(tokyo["hard_bounces"]), int(tokyo["delivered"])) == (1, 4)
    assert (int(tokyo["openers"]), int(tokyo["clickers"]), int(tokyo["unsubscribes"])) == (2, 1, 1)
    assert tokyo["open_rate"] == pytest.approx(50.0)
    osaka = frame.loc["大阪府"]
    assert (int(osaka["openers"]), int(osaka["clickers"]), int(osaka["complaints"])) == (2, 1, 1)
    # f's only message bounced: nothing delivered, so its rates are undefined, not an error.
    hokkaido = frame.loc["北海道"]
    assert int(hokkaido["delivered"]) == 0 and math.isnan(hokkaido["open_rate"])
    assert hokkaido["deliverability"] == pytest.approx(0.0)
    assert "nothing delivered" in hokkaido["note"]
    assert int(frame.loc["(none)", "soft_bounces"]) == 1

    gender = load_metrics_by_attribute(world.db, world.campaign_id, "gender")
    assert gender["recipients"].astype(int).to_dict() == {"F": 6, "M": 4}
    assert int(gender.loc["M", "openers"]) == 2  # d (click), g
    with pytest.raises(NotFoundError):
        load_metrics_by_attribute(world.db, world.campaign_id, "favourite_colour")


def test_by_segment(world: World) -> None:
    frame = load_metrics_by_segment(
        world.db,
        world.campaign_id,
        {"大阪の女性": "prefecture == '大阪府' and gender == 'F'", "男性": "gender == 'M'"},
    )
    assert list(frame.index) == ["大阪の女性", "男性"]
    osaka = frame.loc["大阪の女性"]  # c and h
    assert (int(osaka["recipients"]), int(osaka["openers"]), int(osaka["complaints"])) == (2, 1, 1)
    # ghost hard-bounced and is suppressed now, so no segment holds them any more.
    assert int(frame.loc["男性", "recipients"]) == 3


def test_by_link(world: World) -> None:
    frame = load_link_metrics(world.db, world.campaign_id)
    assert list(frame.index) == [1, 2]
    assert frame.loc[1, "url"] == "https://shop.example.jp/spring"
    assert frame[["clicks", "clickers", "machine_clicks"]].astype(int).to_dict("index") == {
        1: {"clicks": 2, "clickers": 1, "machine_clicks": 1},
        2: {"clicks": 1, "clickers": 1, "machine_clicks": 1},
    }
    assert frame.loc[1, "click_share"] == pytest.approx(200 / 3)
    assert frame.loc[2, "click_rate"] == pytest.approx(100 / 8)


def test_by_hour_and_day_since_sending(world: World) -> None:
    hourly = load_timeline(world.db, world.campaign_id, unit="hour")
    assert list(hourly.index) == list(range(27))  # a's second click at 26 h 5 min
    assert hourly["new_openers"][hourly["new_openers"] > 0].to_dict() == {0: 1, 1: 1, 2: 1, 5: 1}
    assert hourly["new_clickers"][hourly["new_clickers"] > 0].to_dict() == {3: 1, 5: 1}
    assert hourly["opens"][hourly["opens"] > 0].to_dict() == {0: 1, 1: 1, 2: 1, 3: 1}
    assert hourly["machine_opens"].to_dict()[0] == 2
    assert hourly["clicks"][hourly["clicks"] > 0].to_dict() == {3: 1, 5: 1, 26: 1}
    assert int(hourly.loc[1, "unsubscribes"]) == 1
    assert int(hourly["openers"].iloc[-1]) == 4 and int(hourly["clickers"].iloc[-1]) == 2
    assert hourly["open_rate"].iloc[-1] == pytest.approx(50.0)
    assert hourly.loc[2, "open_rate"] == pytest.approx(3 / 8 * 100)
    assert hourly.loc[3, "start"] == pd.Timestamp(world.started_at + timedelta(hours=3))

    daily = load_timeline(world.db, world.campaign_id, unit="day")
    assert list(daily.index) == [0, 1]
    assert daily["clicks"].to_list() == [2, 1]
    assert daily["new_openers"].to_list() == [4, 0]


def test_by_variant_without_a_test_is_one_unassigned_group(world: World) -> None:
    frame = load_metrics_by_variant(world.db, world.campaign_id)
    assert list(frame.index) == ["(unassigned)"]
    assert int(frame.loc["(unassigned)", "clickers"]) == 2


def test_one_pass_cube_gives_the_same_frames(world: World) -> None:
    cube = load_metric_cube(world.db, world.campaign_id, ["prefecture", "gender"])
    assert int(cube["recipients"].sum()) == 10
    totals = summarise_cube(cube)
    single = load_metrics(world.db, world.campaign_id)
    pd.testing.assert_frame_equal(
        totals.reset_index(drop=True), single.reset_index(drop=True), check_dtype=False
    )
    pairs = [
        ("domain", load_metrics_by_domain(world.db, world.campaign_id)),
        ("prefecture", load_metrics_by_attribute(world.db, world.campaign_id, "prefecture")),
        ("gender", load_metrics_by_attribute(world.db, world.campaign_id, "gender")),
        ("variant", load_metrics_by_variant(world.db, world.campaign_id)),
    ]
    for by, expected in pairs:
        got = summarise_cube(cube, by, top=15)
        pd.testing.assert_frame_equal(got, expected, check_dtype=False, check_index_type=False)
    with pytest.raises(ValueError, match="clashes"):
        load_metric_cube(world.db, world.campaign_id, ["variant"])


# --- campaigns that have not (fully) happened ----------------------------------------------


def test_draft_empty_and_still_sending_campaigns_have_notes_not_errors(db: Engine) -> None:
    import_people(db)
    draft = mailkit.create_campaign(db, "下書き", template="spring", segment="", from_addr=FROM)
    row = load_metrics(db, draft.id).iloc[0]
    assert int(row["recipients"]) == 0 and math.isnan(row["open_rate"])
    assert math.isnan(row["deliverability"])
    assert "no recipients" in row["note"]
    assert load_timeline(db, draft.id).empty
    assert load_metrics_by_domain(db, draft.id).empty
    assert build_report(db, draft.id).deliverability is None

    nobody = send_to_sink(db, segment="prefecture == '沖縄県'")
    assert int(load_metrics(db, nobody).iloc[0]["recipients"]) == 0

    sending = mailkit.create_campaign(db, "送信中", template="spring", segment="", from_addr=FROM)
    mailkit.snapshot_campaign(db, sending.id)  # the ledger exists; nothing went out yet
    row = load_metrics(db, sending.id).iloc[0]
    assert (int(row["recipients"]), int(row["pending"]), int(row["sent"])) == (10, 10, 0)
    assert math.isnan(row["click_rate"]) and math.isnan(row["deliverability"])
    assert "still sending: 10 of 10" in row["note"] and "nothing sent yet" in row["note"]

    sent = send_to_sink(db, segment="gender == 'F'")
    row = load_metrics(db, sent).iloc[0]
    assert row["note"].startswith("no human opens recorded")
    assert row["open_rate"] == 0.0 and math.isnan(row["click_to_open_rate"])


def test_event_api_fills_ids_from_the_ledger_and_rejects_bad_rows(db: Engine) -> None:
    import_people(db)
    campaign_id = send_to_sink(db, segment="gender == 'F'")
    rows = ledger_rows(db, campaign_id)
    save_event(db, None, rows["a"], "open", machine=True, user_agent="GoogleImageProxy")
    with db.connect() as conn:
        stored = conn.execute(
            select(
                events.c.campaign_id, events.c.contact_id, events.c.machine, events.c.type
            ).where(events.c.message_id == rows["a"], events.c.type == "open")
        ).one()
        contact = conn.execute(
            select(messages.c.contact_id).where(messages.c.id == rows["a"])
        ).scalar_one()
    assert tuple(stored) == (campaign_id, contact, True, "open")
    with pytest.raises(ValueError, match="unknown event type"):
        save_event(db, campaign_id, rows["a"], "opened")
    with pytest.raises(ValueError, match="naive"):
        save_event(db, campaign_id, rows["a"], "open", occurred_at=datetime(2026, 1, 1))
    with pytest.raises(NotFoundError):
        record_events(db, [{"message_id": 10**9, "type": "open"}])
    assert record_events(db, ({"message_id": rows["c"], "type": "open"} for _ in range(5))) == 5
