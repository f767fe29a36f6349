"""Ledger: claims read the rows they take, not every row sent before them.

A claim asked for "queued, or deferred and due" rows in id order. With an OR over two states,
SQLite and PostgreSQL both walked the campaign's ledger in id order from its first row, past
every row already sent: at 200,000 recipients with 95 % sent, 57 ms (SQLite) and 197 ms
(PostgreSQL) per claim, so a million-recipient campaign spent most of its time claiming.
``claim_rows`` now asks for each state on its own: queued rows along this index, in id order,
and due retries along ``ix_messages_campaign_state_next``, in time order. Both stop after the
rows they take: at the same 200,000 recipients a claim now takes 3.8 ms (SQLite) and 21 ms
(PostgreSQL, where the select itself is 1 ms and the rest is the lease update and its commit).

The index replaces ``ix_messages_campaign_state`` (campaign_id, state), which it extends: on
SQLite the two are the same index (every index ends with the rowid, which is ``id``); on
PostgreSQL the two-column one could not give the id order.

Revision ID: 0009
Revises: 0008
"""

from __future__ import annotations

from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.drop_index("ix_messages_campaign_state", "messages")
    op.create_index("ix_messages_campaign_state_id", "messages", ["campaign_id", "state", "id"])


def downgrade() -> None:
    op.drop_index("ix_messages_campaign_state_id", "messages")
    op.create_index("ix_messages_campaign_state", "messages", ["campaign_id", "state"])
