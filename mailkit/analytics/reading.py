"""One way for the analytics to read: a snapshot that never holds up the writers.

On SQLite the connection's transaction is a deferred ``BEGIN`` (a WAL snapshot) instead of the
engine's ``BEGIN IMMEDIATE``, so a dashboard neither waits for nor blocks the tracking server,
and several dashboard queries run side by side. On PostgreSQL, JIT compilation is turned off
for the transaction: for these wide ``CASE`` aggregates over a million rows it cost seconds
and saved nothing (``bench/scale.py``), and sorts and hashes get room to stay in memory.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any, TypeVar

from sqlalchemy import Connection, Engine

from ..storage.engine import connect_for_reading

__all__ = ["connect_analytics", "open_reader_pool"]

T = TypeVar("T")


@contextmanager
def connect_analytics(db: Engine) -> Iterator[Connection]:
    """A read-only connection tuned for analytics queries (see the module doc)."""
    with connect_for_reading(db) as conn:
        if conn.dialect.name == "postgresql":
            conn.exec_driver_sql("SET LOCAL jit = off")
            conn.exec_driver_sql("SET LOCAL work_mem = '64MB'")
        yield conn


class _InlineExecutor(Executor):
    """Runs each job at once in the calling thread (see ``open_reader_pool``)."""

    def submit(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> Future[T]:
        future: Future[T] = Future()
        try:
            future.set_result(fn(*args, **kwargs))
        except BaseException as exc:  # handed to the caller through the future, as a pool does
            future.set_exception(exc)
        return future


def open_reader_pool(db: Engine, workers: int) -> Executor:
    """Threads to run independent reads side by side (use as a context manager).

    An in-memory SQLite database exists once per connection, and each thread gets its own:
    there the jobs run one after the other in the calling thread instead.
    """
    in_memory = db.dialect.name == "sqlite" and db.url.database in (None, "", ":memory:")
    if in_memory or workers < 2:
        return _InlineExecutor()
    return ThreadPoolExecutor(max_workers=workers, thread_name_prefix="mailkit-read")
