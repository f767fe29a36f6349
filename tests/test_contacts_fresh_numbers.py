"""A fresh load's numbers: a column whose only number is zero still gets its value_num (the
fresh path decides per chunk and column whether any value is a number), on both backends."""

from __future__ import annotations

import pandas as pd
from sqlalchemy import Engine, select

from mailkit.contacts import import_contacts
from mailkit.storage.schema import contact_attributes, contacts


def test_zero_is_a_number_in_a_fresh_load(db: Engine) -> None:
    frame = pd.DataFrame(
        {
            "email": ["a@example.jp", "b@example.jp", "c@example.jp"],
            "score": ["0", "０", "0"],  # zero only, full-width too
            "tag": ["x", "", "0.0"],  # a text value, a blank, a zero
        }
    )
    report = import_contacts(db, frame)
    assert report.added == 3
    ca, c = contact_attributes.c, contacts.c
    with db.connect() as conn:
        rows = conn.execute(
            select(c.email, ca.key, ca.value, ca.value_num)
            .join(contacts, c.id == ca.contact_id)
            .order_by(c.email, ca.key)
        ).all()
    assert [tuple(r) for r in rows] == [
        ("a@example.jp", "score", "0", 0.0),
        ("a@example.jp", "tag", "x", None),
        ("b@example.jp", "score", "０", 0.0),
        ("c@example.jp", "score", "0", 0.0),
        ("c@example.jp", "tag", "0.0", 0.0),
    ]
