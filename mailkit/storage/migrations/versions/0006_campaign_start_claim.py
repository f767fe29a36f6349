"""Campaigns: a claim on starting a draft, so that one worker preflights and snapshots it.

Existing campaigns get no claim (NULL): drafts are free to start, started ones simply do not
record who started them.

Revision ID: 0006
Revises: 0005
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from mailkit.storage.schema import UTCDateTime

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("campaigns") as batch:
        batch.add_column(sa.Column("start_owner", sa.String(64)))
        batch.add_column(sa.Column("start_claim_until", UTCDateTime))


def downgrade() -> None:
    with op.batch_alter_table("campaigns") as batch:
        batch.drop_column("start_claim_until")
        batch.drop_column("start_owner")
