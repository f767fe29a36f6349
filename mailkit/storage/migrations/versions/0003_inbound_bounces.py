"""Inbound bounces: one row per ingested bounce/complaint message (dedupe by hash), lookups.

Revision ID: 0003
Revises: 0002
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from mailkit.storage.schema import UTCDateTime

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "inbound_bounces",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("sha256", sa.String(64), nullable=False),
        sa.Column("source", sa.Text, nullable=False),
        sa.Column("outcome", sa.String(20), nullable=False),
        sa.Column(
            "message_id",
            sa.Integer,
            sa.ForeignKey(
                "messages.id", name="fk_inbound_bounces_message_id_messages", ondelete="SET NULL"
            ),
        ),
        sa.Column("matched_by", sa.String(20)),
        sa.Column("received_at", UTCDateTime, nullable=False),
        sa.UniqueConstraint("sha256", name="uq_inbound_bounces_sha256"),
    )
    # Bounces are matched to ledger rows by Message-ID header and by address.
    op.create_index("ix_messages_message_id", "messages", ["message_id"])
    op.create_index("ix_messages_email", "messages", ["email"])


def downgrade() -> None:
    op.drop_index("ix_messages_email", "messages")
    op.drop_index("ix_messages_message_id", "messages")
    op.drop_table("inbound_bounces")
