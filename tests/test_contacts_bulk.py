"""Large imports: the fresh-load path (indexes and foreign keys set aside, then rebuilt), the
read-ahead thread, and many-chunk imports and updates, on real SQLite and PostgreSQL."""

from __future__ import annotations

import random
import threading
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
from sqlalchemy import Engine, delete, func, insert, inspect, select
from sqlalchemy.exc import IntegrityError

from mailkit.contacts import import_contacts, load_contacts, load_lists
from mailkit.errors import EncodingDetectionError
from mailkit.storage.schema import contact_attributes, contacts, list_members, lists


def table_counts(db: Engine) -> tuple[int, ...]:
    with db.connect() as conn:
        return tuple(
            conn.execute(select(func.count()).select_from(t)).scalar_one()
            for t in (contacts, contact_attributes, lists, list_members)
        )


def contact_table(db: Engine) -> dict[str, dict[str, Any]]:
    with db.connect() as conn:
        rows = conn.execute(select(contacts)).mappings().all()
    return {row["email"]: dict(row) for row in rows}


def schema_shape(db: Engine) -> dict[str, Any]:
    """Indexes and foreign keys of the contact tables, as the database reports them."""
    found = inspect(db)
    tables = ("contacts", "contact_attributes", "list_members")
    return {
        t: (
            sorted(
                (i["name"], tuple(i["column_names"]), i["unique"]) for i in found.get_indexes(t)
            ),
            sorted(
                (k["constrained_columns"], k["referred_table"], k["options"].get("ondelete"))
                for k in found.get_foreign_keys(t)
            ),
        )
        for t in tables
    }


def random_contacts(rng: random.Random, n: int) -> list[dict[str, Any]]:
    prefectures = ["東京都", "大阪府", "北海道", "沖縄県"]
    return [
        {
            "email": f"member{i:05d}@example.jp",
            "氏名": f"会員{i}",
            "prefecture": rng.choice(prefectures),
            "gender": rng.choice("FM"),
            "age": str(rng.randint(18, 80)),
        }
        for i in range(n)
    ]


def test_a_fresh_load_rebuilds_the_indexes_and_foreign_keys_it_set_aside(db: Engine) -> None:
    before = schema_shape(db)
    report = import_contacts(
        db, pd.DataFrame(random_contacts(random.Random(1), 300)), chunk_size=64
    )
    assert report.added == 300
    assert schema_shape(db) == before
    # The foreign keys are enforced again: an attribute of no contact is refused...
    with pytest.raises(IntegrityError), db.begin() as conn:
        conn.execute(insert(contact_attributes).values(contact_id=10**9, key="k", value="v"))
    # ...and deleting a contact still cascades to its attributes.
    with db.begin() as conn:
        first = conn.execute(select(func.min(contacts.c.id))).scalar_one()
        conn.execute(delete(contacts).where(contacts.c.id == first))
        left = conn.execute(
            select(func.count()).where(contact_attributes.c.contact_id == first)
        ).scalar_one()
    assert left == 0


def test_a_fresh_load_that_fails_leaves_the_schema_and_the_store_as_they_were(
    db: Engine, tmp_path: Path
) -> None:
    before = schema_shape(db)
    rows = "".join(f"user{i}@example.com,User {i},{i}\n" for i in range(50))
    path = tmp_path / "late-error.csv"
    path.write_bytes(
        b"email,name,age\n" + rows.encode() + "late@example.jp,山田,1\n".encode("cp932")
    )
    with pytest.raises(EncodingDetectionError):
        import_contacts(db, path, encoding="utf-8", chunk_size=7)
    assert table_counts(db) == (0, 0, 0, 0)
    assert schema_shape(db) == before
    assert not [t for t in threading.enumerate() if t.name == "mailkit-read-ahead"]


def test_many_chunks_round_trip_and_a_partial_update_counts_exactly(
    db: Engine, tmp_path: Path
) -> None:
    rng = random.Random(5)
    people = random_contacts(rng, 1200)
    path = tmp_path / "many.csv"
    pd.DataFrame(people).to_csv(path, index=False)
    first = import_contacts(db, path, chunk_size=97, list_name="全員")
    assert (first.rows, first.added, first.rejected) == (1200, 1200, ())
    stored = load_contacts(db).drop(columns=["id", "domain"]).rename(columns={"name": "氏名"})
    expected = pd.DataFrame(people)[list(stored.columns)]
    pd.testing.assert_frame_equal(stored.reset_index(drop=True), expected)

    # Every third person moves, every fifth is new; the rest are untouched.
    changed = [dict(p, prefecture="京都府") if i % 3 == 0 else p for i, p in enumerate(people)]
    extra = [dict(p, email=p["email"].replace("member", "new")) for p in people[::5]]
    pd.DataFrame(changed + extra).to_csv(path, index=False)
    stamps = contact_table(db)
    second = import_contacts(db, path, chunk_size=89, list_name="全員")
    moved = sum(1 for i, p in enumerate(people) if i % 3 == 0 and p["prefecture"] != "京都府")
    assert second.added == len(extra)
    assert second.updated == moved
    assert second.unchanged == 1200 - moved
    after = contact_table(db)
    for i, person in enumerate(people):
        same = after[person["email"]]["updated_at"] == stamps[person["email"]]["updated_at"]
        assert same == (i % 3 != 0), person
    assert load_lists(db).to_dict("records") == [{"name": "全員", "members": 1200 + len(extra)}]
    with db.connect() as conn:
        ids = conn.execute(select(contacts.c.id)).scalars().all()
    assert len(ids) == len(set(ids)) == 1200 + len(extra)
