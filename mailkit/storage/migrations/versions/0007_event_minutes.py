"""Analytics: events per minute of each campaign, kept true by triggers on ``events``.

Creates ``event_minutes`` (timeline events, i.e. opens, clicks and unsubscribes, counted per
campaign, type, machine flag and UTC minute), the triggers that maintain it on every insert,
update, delete (and, on PostgreSQL, truncate) of ``events`` (``mailkit.storage.event_minutes``),
and backfills it from the events already stored. The timeline then sums minutes instead of
counting every event of a campaign.

Revision ID: 0007
Revises: 0006
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from mailkit.storage.event_minutes import (
    create_event_minute_triggers,
    drop_event_minute_triggers,
    rebuild_event_minutes,
)
from mailkit.storage.schema import UTCDateTime

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "event_minutes",
        sa.Column("campaign_id", sa.Integer, nullable=False),
        sa.Column("type", sa.String(20), nullable=False),
        sa.Column("machine", sa.Boolean, nullable=False),
        sa.Column("minute", UTCDateTime, nullable=False),
        sa.Column("events", sa.Integer, nullable=False),
        sa.PrimaryKeyConstraint(
            "campaign_id", "type", "machine", "minute", name="pk_event_minutes"
        ),
        sqlite_with_rowid=False,
    )
    conn = op.get_bind()
    # Triggers first, in the same transaction: no event can slip between backfill and trigger.
    create_event_minute_triggers(conn)
    rebuild_event_minutes(conn)


def downgrade() -> None:
    drop_event_minute_triggers(op.get_bind())
    op.drop_table("event_minutes")
