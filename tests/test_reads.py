"""Reads never queue behind a writer on SQLite.

A campaign sending from the workspace's SQLite file holds the write lock during each of its
commits, an import for the whole import. What an analyst looks at meanwhile (contacts, lists,
templates, campaigns, segment counts) and what ``run-due`` checks must read the last committed
state at once: before, each of these reads began with ``BEGIN IMMEDIATE`` and so waited for the
lock (up to the 30 s busy timeout), then held it for as long as it read.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from lock_support import read_while_locked
from sqlalchemy import Engine
from test_dispatch_support import addresses, make_campaign

import mailkit

READS: dict[str, Callable[[Engine, int], Any]] = {
    "load_contacts": lambda db, _: len(mailkit.load_contacts(db)),
    "load_lists": lambda db, _: len(mailkit.load_lists(db)),
    "load_suppressions": lambda db, _: len(mailkit.load_suppressions(db)),
    "load_template": lambda db, cid: (
        mailkit.load_template(db, mailkit.load_campaign(db, cid).template_id).name
    ),
    "load_campaigns": lambda db, _: len(mailkit.load_campaigns(db)),
    "load_variants": lambda db, cid: len(mailkit.load_variants(db, cid)),
    "load_sending_window": lambda db, cid: mailkit.load_sending_window(db, cid),
    "count_segment": lambda db, _: mailkit.count_segment(db, "prefecture == '東京都'"),
    "fetch_members": lambda db, _: len(mailkit.fetch_members(db, "all")),
    "find_due_campaigns": lambda db, _: len(mailkit.find_due_campaigns(db)),
    "count_bounce_rejects": lambda db, _: mailkit.count_bounce_rejects(db),
}


@pytest.mark.parametrize("name", sorted(READS))
def test_a_read_does_not_wait_for_another_connections_write_lock(
    sqlite_db: Engine, name: str
) -> None:
    read = READS[name]
    campaign_id = make_campaign(sqlite_db, addresses(5))
    expected = read(sqlite_db, campaign_id)
    # Uncommitted changes the reads must not see.
    seen = read_while_locked(
        sqlite_db,
        lambda: read(sqlite_db, campaign_id),
        ("DELETE FROM contact_attributes", ()),
        ("UPDATE contacts SET name = 'changed'", ()),
    )
    assert seen == expected
