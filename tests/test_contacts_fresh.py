"""A fresh load (empty store: writes built ahead by attribute column) stores exactly what a
merge into a non-empty store does, value_num included, on both backends."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sqlalchemy import Engine, select

from mailkit.contacts import import_contacts, load_lists
from mailkit.storage.schema import contact_attributes, contacts

# Column by column: small integers (SQLite casts them), a mixed column ([value, number]
# pairs), text only, full-width digits (numbers, but not for CAST), and empty cells.
ROWS = [
    ("a@example.jp", "佐藤", "30", "30", "東京都", "３０", "16"),
    ("b@example.jp", "", "030", "-1.5", "大阪府", "", "1234567890123456"),
    ("c@example.jp", "鈴木", "+5", "1e3", "", "１", "123456789012345"),
    ("d@example.jp", "", "-0", "東京", "北海道", "２", ""),
    ("e@example.jp", "高橋", "", ".5", "東京都", "", "-7"),
]
HEADER = "email,name,age,mixed,prefecture,rank,points"


def write_csv(path: Path) -> Path:
    path.write_text(HEADER + "\n" + "".join(",".join(r) + "\n" for r in ROWS), encoding="utf-8")
    return path


def stored(db: Engine) -> tuple[dict[str, Any], dict[tuple[str, str], tuple[str, Any]]]:
    c, a = contacts.c, contact_attributes.c
    with db.connect() as conn:
        people = {r.email: (r.name, r.domain) for r in conn.execute(select(contacts)).all()}
        attrs = conn.execute(
            select(c.email, a.key, a.value, a.value_num).join(contacts, c.id == a.contact_id)
        ).all()
    return people, {(r.email, r.key): (r.value, r.value_num) for r in attrs}


def test_a_fresh_load_stores_what_a_merge_stores(db: Engine, tmp_path: Path) -> None:
    path = write_csv(tmp_path / "people.csv")
    report = import_contacts(db, path, list_name="会員", chunk_size=2)
    assert (report.added, report.rejected) == (len(ROWS), ())
    assert load_lists(db).to_dict("records") == [{"name": "会員", "members": len(ROWS)}]
    fresh = stored(db)
    if db.dialect.name == "sqlite":
        # The import checks no foreign keys in its transaction; the pool gets them back on.
        with db.connect() as conn:
            assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar_one() == 1

    with db.begin() as conn:
        conn.execute(contacts.delete())  # their attributes and memberships go with them
    seed = tmp_path / "seed.csv"
    seed.write_text("email,age\nz@example.jp,1\n", encoding="utf-8")
    import_contacts(db, seed)  # the store is no longer empty: the next import merges
    merged = import_contacts(db, path, list_name="会員", chunk_size=2)
    assert (merged.added, merged.rejected) == (len(ROWS), ())
    people, attrs = stored(db)
    del people["z@example.jp"], attrs[("z@example.jp", "age")]
    assert fresh == (people, attrs)
    assert load_lists(db).to_dict("records") == [{"name": "会員", "members": len(ROWS)}]

    assert attrs[("a@example.jp", "age")] == ("30", 30.0)
    assert attrs[("b@example.jp", "age")] == ("030", 30.0)
    assert attrs[("c@example.jp", "age")] == ("+5", 5.0)
    assert attrs[("d@example.jp", "age")] == ("-0", 0.0)
    assert ("e@example.jp", "age") not in attrs
    assert attrs[("c@example.jp", "mixed")] == ("1e3", None)
    assert attrs[("e@example.jp", "mixed")] == (".5", 0.5)
    assert attrs[("a@example.jp", "rank")] == ("３０", 30.0)
    assert attrs[("b@example.jp", "points")] == ("1234567890123456", 1234567890123456.0)
    assert attrs[("c@example.jp", "points")] == ("123456789012345", 123456789012345.0)
    assert attrs[("a@example.jp", "prefecture")] == ("東京都", None)
    assert people["b@example.jp"] == (None, "example.jp")
