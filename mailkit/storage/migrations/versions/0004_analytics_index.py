"""Analytics: a covering index for per-recipient engagement over a campaign's events.

The metric queries group a campaign's events by ledger row (``message_id``) and read only
``type``, ``machine`` and ``occurred_at``; with this index they scan it alone, in order,
without touching the table (``bench/analytics.py`` measures the difference).

Revision ID: 0004
Revises: 0003
"""

from __future__ import annotations

from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index(
        "ix_events_campaign_message",
        "events",
        ["campaign_id", "message_id", "type", "machine", "occurred_at"],
    )


def downgrade() -> None:
    op.drop_index("ix_events_campaign_message", "events")
