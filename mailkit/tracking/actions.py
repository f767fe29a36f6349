"""What an unsubscribe does, wherever it comes from (the web page, one-click, a mailto mail)."""

from __future__ import annotations

from datetime import datetime
from typing import Final

from sqlalchemy import Engine, insert, select

from ..contacts import save_suppression
from ..errors import NotFoundError
from ..storage import connect_for_reading
from ..storage.schema import events, messages, utcnow

__all__ = ["UNSUBSCRIBE_SOURCES", "save_unsubscribe"]

#: How an unsubscribe arrived: the confirmation page's button, an RFC 8058 one-click POST from
#: the mail client, or a mail to the List-Unsubscribe mailto address.
UNSUBSCRIBE_SOURCES: Final = ("page", "one_click", "mailto")


def save_unsubscribe(
    db: Engine,
    message_row_id: int,
    *,
    source: str,
    user_agent: str | None = None,
    ip_hash: str | None = None,
    occurred_at: datetime | None = None,
) -> bool:
    """Suppress the recipient of a message and record an ``unsubscribe`` event for it.

    Repeats are harmless: the address is suppressed once (an earlier reason, say a bounce,
    is kept), and a message gets one unsubscribe event however often it is used. Returns
    True when this call recorded the event. NotFoundError if the message does not exist.
    """
    if source not in UNSUBSCRIBE_SOURCES:
        raise ValueError(f"source must be one of {UNSUBSCRIBE_SOURCES}, not {source!r}")
    m = messages.c
    with connect_for_reading(db) as conn:
        row = conn.execute(
            select(m.campaign_id, m.contact_id, m.email).where(m.id == message_row_id)
        ).first()
    if row is None:
        raise NotFoundError("message", message_row_id)
    save_suppression(
        db,
        row.email,
        reason="unsubscribe",
        detail=f"{source.replace('_', '-')} unsubscribe from campaign {row.campaign_id}",
        campaign_id=row.campaign_id,
    )
    e = events.c
    with db.begin() as conn:
        seen = conn.execute(
            select(e.id).where(e.message_id == message_row_id, e.type == "unsubscribe").limit(1)
        ).first()
        if seen is not None:
            return False
        conn.execute(
            insert(events).values(
                campaign_id=row.campaign_id,
                message_id=message_row_id,
                contact_id=row.contact_id,
                type="unsubscribe",
                occurred_at=occurred_at or utcnow(),
                detail={"source": source},
                user_agent=user_agent,
                ip_hash=ip_hash,
                machine=False,
            )
        )
    return True
