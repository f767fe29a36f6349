"""Shared by the tests that read while another connection holds SQLite's write lock."""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Callable
from typing import Any, TypeVar

from sqlalchemy import Engine

T = TypeVar("T")

#: Long enough for any of these reads; short against the 30 s busy timeout a read that queued
#: behind the lock would wait.
PATIENCE = 10.0


def read_while_locked(db: Engine, read: Callable[[], T], *uncommitted: tuple[str, Any]) -> T:
    """``read()`` in a thread while a plain sqlite3 connection holds the write lock of ``db``'s
    file with the ``uncommitted`` (sql, params) statements applied; fails the test if the read
    waited for the lock, and returns what it read (the uncommitted changes are rolled back)."""
    writer = sqlite3.connect(str(db.url.database), isolation_level=None)
    writer.execute("BEGIN IMMEDIATE")
    for sql, params in uncommitted:
        writer.execute(sql, params)
    results: list[T] = []
    reader = threading.Thread(target=lambda: results.append(read()), daemon=True)
    reader.start()
    reader.join(timeout=PATIENCE)
    blocked = reader.is_alive()
    writer.execute("ROLLBACK")
    writer.close()
    reader.join()
    assert not blocked, "a read waited for another connection's write lock"
    assert results, "the read raised (see the thread's traceback above)"
    return results[0]
