"""The preflight of proven templates asked in SQL (``count_proven_members``) agrees with the
member-by-member check it short-cuts: it answers only when nobody can fail, and then with the
number of members checked."""

from __future__ import annotations

import pandas as pd
import pytest
from sqlalchemy import Engine

from mailkit import create_campaign, import_contacts, load_campaign, save_template
from mailkit.dispatch.pipeline import check_members, load_campaign_content
from mailkit.dispatch.starting import count_proven_members
from mailkit.segments import fetch_member_records

TRACKER = object()  # only its presence matters: unsubscribe_url is then in every context

PEOPLE = pd.DataFrame(
    {
        "email": [f"p{i}@example.jp" for i in range(6)],
        "name": ["山田", "佐藤", "鈴木", "高橋", "田中", "伊藤"],
        "prefecture": ["東京都", "大阪府", "北海道", "東京都", "京都府", "沖縄県"],
        "points": ["10", "20", "30", "40", "50", "60"],
    }
)


def _campaign(db: Engine, html: str, people: pd.DataFrame) -> int:
    import_contacts(db, people, list_name="all")
    save_template(db, "t", subject="春のご案内", html=html)
    return create_campaign(
        db, "c", template="t", segment="list == 'all'", from_addr="a@example.jp"
    ).id


def _holes(**columns: dict[int, None]) -> pd.DataFrame:
    people = PEOPLE.copy()
    for column, rows in columns.items():
        for row in rows:
            people.loc[row, column] = None
    return people


CASES = [
    # (html, people, tracker, expect the shortcut to answer)
    ("<p>{{ name }}様 {{ prefecture }} {{ points }}pt</p>", PEOPLE, None, True),
    ("<p>{{ prefecture }} {{ email }} {{ domain }} {{ id }}</p>", PEOPLE, None, True),
    ("<p>{{ prefecture }}</p>", _holes(prefecture={3: None}), None, False),
    ("<p>{{ name }}様</p>", _holes(name={0: None}), None, False),
    ("<p>{{ name }}様</p>", _holes(prefecture={3: None}), None, True),  # a field it does not read
    ("<p>{{ nickname }}</p>", PEOPLE, None, False),  # nobody has it
    ("<p><a href='{{ unsubscribe_url }}'>配信停止</a></p>", PEOPLE, TRACKER, True),
    ("<p><a href='{{ unsubscribe_url }}'>配信停止</a></p>", PEOPLE, None, False),
    ("<p>{{ contact.prefecture }}</p>", PEOPLE, None, None),  # whatever the template proof says
]


@pytest.mark.parametrize(("html", "people", "tracker", "answers"), CASES)
def test_the_sql_preflight_agrees_with_the_member_by_member_check(
    db: Engine, html: str, people: pd.DataFrame, tracker: object, answers: bool | None
) -> None:
    campaign = load_campaign(db, _campaign(db, html, people))
    content = load_campaign_content(db, campaign)
    proven = count_proven_members(db, campaign.segment, content, tracker)  # type: ignore[arg-type]
    records = fetch_member_records(db, campaign.segment)
    failures, checked = check_members(content, records, tracker)  # type: ignore[arg-type]
    if answers is not None:
        assert (proven is not None) == answers
    if proven is not None:
        assert failures == [] and proven == checked == len(people)
