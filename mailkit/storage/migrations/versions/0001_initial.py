"""Initial schema: contacts, attributes, lists, suppressions, templates, campaigns, ledger, events.

Revision ID: 0001
Revises:
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from mailkit.storage.schema import BigId, UTCDateTime

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "contacts",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("email", sa.String(320), nullable=False),
        sa.Column("name", sa.String(200)),
        sa.Column("domain", sa.String(255), nullable=False),
        sa.Column("created_at", UTCDateTime, nullable=False),
        sa.Column("updated_at", UTCDateTime, nullable=False),
        sa.UniqueConstraint("email", name="uq_contacts_email"),
    )
    op.create_index("ix_contacts_domain", "contacts", ["domain"])
    op.create_table(
        "contact_attributes",
        sa.Column(
            "contact_id",
            sa.Integer,
            sa.ForeignKey("contacts.id", ondelete="CASCADE"),
            primary_key=True,
        ),
        sa.Column("key", sa.String(100), primary_key=True),
        sa.Column("value", sa.Text, nullable=False),
        sa.Column("value_num", sa.Float),
    )
    op.create_index("ix_contact_attributes_key_value", "contact_attributes", ["key", "value"])
    op.create_index(
        "ix_contact_attributes_key_value_num", "contact_attributes", ["key", "value_num"]
    )
    op.create_table(
        "lists",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("created_at", UTCDateTime, nullable=False),
        sa.UniqueConstraint("name", name="uq_lists_name"),
    )
    op.create_table(
        "list_members",
        sa.Column(
            "list_id", sa.Integer, sa.ForeignKey("lists.id", ondelete="CASCADE"), primary_key=True
        ),
        sa.Column(
            "contact_id",
            sa.Integer,
            sa.ForeignKey("contacts.id", ondelete="CASCADE"),
            primary_key=True,
        ),
        sa.Column("added_at", UTCDateTime, nullable=False),
    )
    op.create_index("ix_list_members_contact_id", "list_members", ["contact_id"])
    op.create_table(
        "suppressions",
        sa.Column("email", sa.String(320), primary_key=True),
        sa.Column("reason", sa.String(40), nullable=False),
        sa.Column("detail", sa.Text),
        sa.Column("campaign_id", sa.Integer),
        sa.Column("created_at", UTCDateTime, nullable=False),
    )
    op.create_table(
        "templates",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("subject", sa.Text, nullable=False),
        sa.Column("html", sa.Text, nullable=False),
        sa.Column("text", sa.Text),
        sa.Column("version", sa.Integer, nullable=False),
        sa.Column("created_at", UTCDateTime, nullable=False),
        sa.Column("updated_at", UTCDateTime, nullable=False),
        sa.UniqueConstraint("name", name="uq_templates_name"),
    )
    op.create_table(
        "campaigns",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("template_id", sa.Integer, sa.ForeignKey("templates.id"), nullable=False),
        sa.Column("template_version", sa.Integer, nullable=False),
        sa.Column("segment", sa.Text, nullable=False),
        sa.Column("from_addr", sa.String(400), nullable=False),
        sa.Column("reply_to", sa.String(400)),
        sa.Column("status", sa.String(20), nullable=False),
        sa.Column("status_reason", sa.Text),
        sa.Column("snapshot_hash", sa.String(64)),
        sa.Column("send_at", UTCDateTime),
        sa.Column("created_at", UTCDateTime, nullable=False),
        sa.Column("started_at", UTCDateTime),
        sa.Column("finished_at", UTCDateTime),
    )
    op.create_table(
        "messages",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column(
            "campaign_id",
            sa.Integer,
            sa.ForeignKey("campaigns.id", ondelete="CASCADE"),
            nullable=False,
        ),
        sa.Column("contact_id", sa.Integer, sa.ForeignKey("contacts.id"), nullable=False),
        sa.Column("email", sa.String(320), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("attempts", sa.Integer, nullable=False),
        sa.Column("message_id", sa.String(255)),
        sa.Column("smtp_code", sa.Integer),
        sa.Column("smtp_reply", sa.Text),
        sa.Column("next_attempt_at", UTCDateTime),
        sa.Column("lease_owner", sa.String(64)),
        sa.Column("lease_expires_at", UTCDateTime),
        sa.Column("sent_at", UTCDateTime),
        sa.Column("updated_at", UTCDateTime, nullable=False),
        sa.UniqueConstraint("campaign_id", "contact_id", name="uq_messages_campaign_contact"),
    )
    op.create_index("ix_messages_campaign_state", "messages", ["campaign_id", "state"])
    op.create_table(
        "events",
        sa.Column("id", BigId, primary_key=True),
        sa.Column("campaign_id", sa.Integer, sa.ForeignKey("campaigns.id", ondelete="CASCADE")),
        sa.Column("message_id", sa.Integer, sa.ForeignKey("messages.id", ondelete="CASCADE")),
        sa.Column("contact_id", sa.Integer, sa.ForeignKey("contacts.id")),
        sa.Column("type", sa.String(20), nullable=False),
        sa.Column("occurred_at", UTCDateTime, nullable=False),
        sa.Column("detail", sa.JSON),
    )
    op.create_index("ix_events_campaign_type", "events", ["campaign_id", "type"])


def downgrade() -> None:
    for table in (
        "events",
        "messages",
        "campaigns",
        "templates",
        "suppressions",
        "list_members",
        "lists",
        "contact_attributes",
        "contacts",
    ):
        op.drop_table(table)
