"""Analytics: the per-recipient engagement summary, kept true by triggers on ``events``.

Creates ``engagement`` (one row per campaign and ledger row with engagement events: counts of
human and machine opens and clicks, bounces, soft bounces, unsubscribes, complaints, and the
first human open and click times), the triggers that maintain it on every insert, update and
delete of ``events`` (``mailkit.storage.engagement``), and backfills it from the events already
stored. The metrics then read one row per recipient instead of grouping every event.

Revision ID: 0005
Revises: 0004
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from mailkit.storage.engagement import (
    create_engagement_triggers,
    drop_engagement_triggers,
    rebuild_engagement,
)
from mailkit.storage.schema import UTCDateTime

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    counts = (
        "opens",
        "machine_opens",
        "clicks",
        "machine_clicks",
        "bounces",
        "soft_bounces",
        "unsubscribes",
        "complaints",
    )
    op.create_table(
        "engagement",
        sa.Column("campaign_id", sa.Integer, nullable=False),
        sa.Column("message_id", sa.Integer, nullable=False),
        *(sa.Column(name, sa.Integer, nullable=False) for name in counts),
        sa.Column("first_open_at", UTCDateTime),
        sa.Column("first_click_at", UTCDateTime),
        sa.PrimaryKeyConstraint("campaign_id", "message_id", name="pk_engagement"),
        sqlite_with_rowid=False,
    )
    op.create_index("ix_engagement_first_open", "engagement", ["campaign_id", "first_open_at"])
    op.create_index("ix_engagement_first_click", "engagement", ["campaign_id", "first_click_at"])
    # The summary replaces the per-recipient grouping of events that 0004's covering index
    # served; what still reads events (timeline, links) wants (campaign, type, machine, time).
    # ``ix_events_campaign_type`` is a prefix of the new index.
    op.drop_index("ix_events_campaign_message", "events")
    op.drop_index("ix_events_campaign_type", "events")
    op.create_index(
        "ix_events_campaign_type_time",
        "events",
        ["campaign_id", "type", "machine", "occurred_at", "link_id", "message_id"],
    )
    conn = op.get_bind()
    # Triggers first, in the same transaction: no event can slip between backfill and trigger
    # (on SQLite the migration holds the write lock; on PostgreSQL writers wait on the DDL).
    create_engagement_triggers(conn)
    rebuild_engagement(conn, minutes=False)  # event_minutes comes with 0007


def downgrade() -> None:
    drop_engagement_triggers(op.get_bind())
    op.drop_table("engagement")
    op.drop_index("ix_events_campaign_type_time", "events")
    op.create_index("ix_events_campaign_type", "events", ["campaign_id", "type"])
    op.create_index(
        "ix_events_campaign_message",
        "events",
        ["campaign_id", "message_id", "type", "machine", "occurred_at"],
    )
