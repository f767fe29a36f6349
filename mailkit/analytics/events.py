"""Writing engagement and delivery events: one row, or millions in bulk.

The tracking server, the bounce processor, the tests and the benchmark all write events through
these two functions, so that every event row carries the same fields the metrics count on:
``campaign_id`` and ``message_id`` (the ledger row), ``contact_id``, ``type``, ``occurred_at``
(aware UTC), ``machine`` (image proxies, prefetchers, link scanners) and, for clicks,
``link_id``.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from datetime import datetime
from itertools import islice
from typing import Any

from sqlalchemy import Connection, Engine, insert, select

from ..errors import NotFoundError
from ..storage.schema import events, messages, utcnow

__all__ = ["EVENT_TYPES", "record_events", "save_event"]

#: Event types the metrics know. ``bounce`` is permanent (detail ``kind``: hard | rejected |
#: expired); ``soft_bounce`` is a temporary failure reported for a message (e.g. a delayed DSN).
EVENT_TYPES = frozenset(
    {"sent", "bounce", "soft_bounce", "open", "click", "unsubscribe", "complaint", "suppressed"}
)

_FIELDS = ("campaign_id", "message_id", "contact_id", "type", "occurred_at", "detail")
_OPTIONAL = ("link_id", "user_agent", "ip_hash")
_CHUNK = 20_000


def _normalise(row: Mapping[str, Any], now: datetime) -> dict[str, Any]:
    kind = row.get("type")
    if kind not in EVENT_TYPES:
        raise ValueError(f"unknown event type {kind!r}: use one of {sorted(EVENT_TYPES)}")
    if row.get("message_id") is None:
        raise ValueError("an event needs the message_id of its ledger row")
    occurred = row.get("occurred_at") or now
    if occurred.tzinfo is None:
        raise ValueError(f"occurred_at {occurred!r} is naive: pass a timezone-aware datetime")
    out = {field: row.get(field) for field in _FIELDS}
    out.update({field: row.get(field) for field in _OPTIONAL})
    out["occurred_at"] = occurred
    out["machine"] = bool(row.get("machine", False))
    return out


def _chunks(rows: Iterable[Mapping[str, Any]], size: int) -> Iterator[list[Mapping[str, Any]]]:
    it = iter(rows)
    while chunk := list(islice(it, size)):
        yield chunk


def _fill_from_ledger(conn: Connection, chunk: list[dict[str, Any]]) -> None:
    """Take campaign and contact ids the caller left out from the ledger rows."""
    missing = {
        r["message_id"] for r in chunk if r["campaign_id"] is None or r["contact_id"] is None
    }
    if not missing:
        return
    found = {
        row.id: (row.campaign_id, row.contact_id)
        for row in conn.execute(
            select(messages.c.id, messages.c.campaign_id, messages.c.contact_id).where(
                messages.c.id.in_(missing)
            )
        )
    }
    for r in chunk:
        if r["message_id"] in missing:
            if r["message_id"] not in found:
                raise NotFoundError("message", r["message_id"])
            campaign_id, contact_id = found[r["message_id"]]
            r["campaign_id"] = r["campaign_id"] or campaign_id
            r["contact_id"] = r["contact_id"] or contact_id


def record_events(
    db: Engine | Connection, rows: Iterable[Mapping[str, Any]], *, chunk_size: int = _CHUNK
) -> int:
    """Insert many events (dicts with the column names of ``events``); return how many.

    Each row needs ``type`` and ``message_id``; ``campaign_id`` and ``contact_id`` are taken
    from the ledger row when left out, ``occurred_at`` defaults to now, ``machine`` to False.
    Rows go in as executemany batches of ``chunk_size``, each batch its own transaction when
    ``db`` is an Engine (pass a Connection to make the whole load one transaction).
    """
    now = utcnow()
    total = 0
    for raw_chunk in _chunks(rows, chunk_size):
        chunk = [_normalise(r, now) for r in raw_chunk]
        if isinstance(db, Engine):
            with db.begin() as conn:
                _fill_from_ledger(conn, chunk)
                conn.execute(insert(events), chunk)
        else:
            _fill_from_ledger(db, chunk)
            db.execute(insert(events), chunk)
        total += len(chunk)
    return total


def save_event(
    db: Engine | Connection,
    campaign_id: int | None,
    message_id: int,
    type: str,
    *,
    occurred_at: datetime | None = None,
    machine: bool = False,
    link_id: int | None = None,
    detail: Mapping[str, Any] | None = None,
    user_agent: str | None = None,
    ip_hash: str | None = None,
) -> None:
    """Insert one event for a ledger row (see ``record_events`` for the fields)."""
    record_events(
        db,
        [
            {
                "campaign_id": campaign_id,
                "message_id": message_id,
                "type": type,
                "occurred_at": occurred_at,
                "machine": machine,
                "link_id": link_id,
                "detail": dict(detail) if detail is not None else None,
                "user_agent": user_agent,
                "ip_hash": ip_hash,
            }
        ],
    )
