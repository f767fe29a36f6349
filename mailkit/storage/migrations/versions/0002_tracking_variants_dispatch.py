"""Tracking links, event context, A/B variants, sending windows, domain pacing, kept-aside bounces.

Revision ID: 0002
Revises: 0001
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from mailkit.storage.schema import UTCDateTime

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("campaigns") as batch:
        batch.add_column(
            sa.Column("tracking", sa.Boolean, nullable=False, server_default=sa.true())
        )
        batch.add_column(sa.Column("tracking_base_url", sa.String(400)))
        batch.add_column(
            sa.Column("timezone", sa.String(64), nullable=False, server_default="Asia/Tokyo")
        )
        batch.add_column(sa.Column("window_start", sa.String(5)))
        batch.add_column(sa.Column("window_end", sa.String(5)))
        batch.add_column(sa.Column("ab_seed", sa.Integer))
        batch.add_column(sa.Column("ab_fraction", sa.Float))
        batch.add_column(sa.Column("ab_metric", sa.String(20)))
        batch.add_column(sa.Column("ab_winner", sa.String(40)))
    op.create_table(
        "campaign_variants",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column(
            "campaign_id",
            sa.Integer,
            sa.ForeignKey("campaigns.id", ondelete="CASCADE"),
            nullable=False,
        ),
        sa.Column("name", sa.String(40), nullable=False),
        sa.Column("template_id", sa.Integer, sa.ForeignKey("templates.id"), nullable=False),
        sa.Column("template_version", sa.Integer, nullable=False),
        sa.Column("subject", sa.Text),
        sa.UniqueConstraint("campaign_id", "name", name="uq_campaign_variants_campaign_id"),
    )
    with op.batch_alter_table("messages") as batch:
        batch.add_column(sa.Column("variant", sa.String(40)))
        batch.add_column(sa.Column("domain", sa.String(255)))
    op.create_index(
        "ix_messages_campaign_state_next", "messages", ["campaign_id", "state", "next_attempt_at"]
    )
    op.create_table(
        "links",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column(
            "campaign_id",
            sa.Integer,
            sa.ForeignKey("campaigns.id", ondelete="CASCADE"),
            nullable=False,
        ),
        sa.Column("url", sa.Text, nullable=False),
        sa.Column("position", sa.Integer, nullable=False),
        sa.UniqueConstraint("campaign_id", "position", name="uq_links_campaign_id"),
    )
    with op.batch_alter_table("events") as batch:
        batch.add_column(
            sa.Column(
                "link_id",
                sa.Integer,
                sa.ForeignKey("links.id", name="fk_events_link_id_links", ondelete="CASCADE"),
            )
        )
        batch.add_column(sa.Column("user_agent", sa.Text))
        batch.add_column(sa.Column("ip_hash", sa.String(64)))
        batch.add_column(
            sa.Column("machine", sa.Boolean, nullable=False, server_default=sa.false())
        )
    op.create_index("ix_events_message_type", "events", ["message_id", "type"])
    op.create_index("ix_events_campaign_occurred", "events", ["campaign_id", "occurred_at"])
    op.create_table(
        "domain_pacing",
        sa.Column("domain", sa.String(255), primary_key=True),
        sa.Column("slow_until", UTCDateTime),
        sa.Column("penalty", sa.Integer, nullable=False, server_default="0"),
        sa.Column("last_reply", sa.Text),
        sa.Column("updated_at", UTCDateTime, nullable=False),
    )
    op.create_table(
        "bounce_rejects",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("source", sa.Text, nullable=False),
        sa.Column("reason", sa.Text, nullable=False),
        sa.Column("raw", sa.LargeBinary),
        sa.Column("received_at", UTCDateTime, nullable=False),
    )


def downgrade() -> None:
    op.drop_table("bounce_rejects")
    op.drop_table("domain_pacing")
    op.drop_index("ix_events_campaign_occurred", "events")
    op.drop_index("ix_events_message_type", "events")
    with op.batch_alter_table("events") as batch:
        for column in ("machine", "ip_hash", "user_agent", "link_id"):
            batch.drop_column(column)
    op.drop_table("links")
    op.drop_index("ix_messages_campaign_state_next", "messages")
    with op.batch_alter_table("messages") as batch:
        batch.drop_column("domain")
        batch.drop_column("variant")
    op.drop_table("campaign_variants")
    with op.batch_alter_table("campaigns") as batch:
        for column in (
            "ab_winner",
            "ab_metric",
            "ab_fraction",
            "ab_seed",
            "window_end",
            "window_start",
            "timezone",
            "tracking_base_url",
            "tracking",
        ):
            batch.drop_column(column)
