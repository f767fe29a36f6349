"""How many distinct values each contact attribute takes among a campaign's recipients.

The dashboard charts the attributes with few values (at most 50). Counting every value of
every attribute of a million recipients is a join and a sort of millions of rows; when the
recipients are most of the contacts, walking each attribute's distinct values in index order
(``ix_contact_attributes_key_value``) and asking whether some recipient has it finds the same
counts in a few hundred index probes, and stops at the cap.
"""

from __future__ import annotations

from sqlalchemy import Connection, Engine, distinct, exists, func, select

from ..segments import load_attribute_names
from ..storage.schema import contact_attributes, contacts, messages
from .reading import connect_analytics

__all__ = ["load_attribute_sizes"]


def _count_by_join(conn: Connection, campaign_id: int) -> dict[str, int]:
    ca = contact_attributes.c
    query = (
        select(ca.key, func.count(distinct(ca.value)))
        .join(messages, messages.c.contact_id == ca.contact_id)
        .where(messages.c.campaign_id == campaign_id)
        .group_by(ca.key)
    )
    return {k: int(n) for k, n in conn.execute(query).all()}


def _count_by_probing(conn: Connection, campaign_id: int, key: str, cap: int) -> int:
    """Distinct values of ``key`` some recipient has, counted up to ``cap``."""
    ca, m = contact_attributes.c, messages.c
    found = 0
    value: str | None = None
    while found < cap:
        following = select(func.min(ca.value)).where(ca.key == key)
        if value is not None:
            following = following.where(ca.value > value)
        value = conn.execute(following).scalar_one()
        if value is None:
            break
        held = exists().where(
            ca.key == key,
            ca.value == value,
            m.contact_id == ca.contact_id,
            m.campaign_id == campaign_id,
        )
        found += bool(conn.execute(select(held)).scalar_one())
    return found


def load_attribute_sizes(db: Engine, campaign_id: int, cap: int) -> dict[str, int]:
    """Attribute key → distinct values among the recipients (at most ``cap``; 0 when none).

    Exact below ``cap``. Probing costs at most the contacts who are not recipients, the join
    the recipients: the cheaper one is used.
    """
    with connect_analytics(db) as conn:
        recipients = conn.execute(
            select(func.count()).select_from(messages).where(messages.c.campaign_id == campaign_id)
        ).scalar_one()
        everyone = conn.execute(select(func.count()).select_from(contacts)).scalar_one()
        if recipients * 2 < everyone:
            return {k: min(n, cap) for k, n in _count_by_join(conn, campaign_id).items()}
    keys = load_attribute_names(db)
    with connect_analytics(db) as conn:
        return {key: _count_by_probing(conn, campaign_id, key, cap) for key in sorted(keys)}
