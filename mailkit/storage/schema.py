"""The current schema, as SQLAlchemy Core tables.

This describes the schema at migration head; migrations under ``migrations/versions`` are what
create and change it in a database. Attributes live in a narrow key/value table with a numeric
shadow column, so that segment filters are plain indexed SQL on SQLite and PostgreSQL alike.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Column,
    DateTime,
    Dialect,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
    text,
)
from sqlalchemy.types import TypeDecorator

__all__ = [
    "LEDGER_STATES",
    "PENDING_STATES",
    "UTCDateTime",
    "bounce_rejects",
    "campaign_variants",
    "campaigns",
    "contact_attributes",
    "contacts",
    "domain_pacing",
    "engagement",
    "event_minutes",
    "events",
    "inbound_bounces",
    "links",
    "list_members",
    "lists",
    "messages",
    "metadata",
    "suppressions",
    "templates",
    "utcnow",
]

metadata = MetaData(
    naming_convention={
        "ix": "ix_%(column_0_label)s",
        "uq": "uq_%(table_name)s_%(column_0_name)s",
        "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
        "pk": "pk_%(table_name)s",
    }
)

# SQLite has no BIGINT autoincrement; PostgreSQL wants one for events.
BigId = BigInteger().with_variant(Integer(), "sqlite")


def utcnow() -> datetime:
    return datetime.now(UTC)


class UTCDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC timestamps on every backend (SQLite drops the zone otherwise)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError(f"naive datetime {value!r}: pass a timezone-aware value")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: Any, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if isinstance(value, str):
            value = datetime.fromisoformat(value)
        assert isinstance(value, datetime)
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


contacts = Table(
    "contacts",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("email", String(320), nullable=False, unique=True),
    Column("name", String(200)),
    Column("domain", String(255), nullable=False, index=True),
    Column("created_at", UTCDateTime, nullable=False, default=utcnow),
    Column("updated_at", UTCDateTime, nullable=False, default=utcnow),
)

contact_attributes = Table(
    "contact_attributes",
    metadata,
    Column("contact_id", Integer, ForeignKey("contacts.id", ondelete="CASCADE"), primary_key=True),
    Column("key", String(100), primary_key=True),
    Column("value", Text, nullable=False),
    # The value as a number when it reads as one, so `age >= 30` is a numeric comparison.
    Column("value_num", Float),
    Index("ix_contact_attributes_key_value", "key", "value"),
    # Numbers only: every comparison on value_num implies it is not NULL, and most values
    # (names, prefectures...) are not numbers, so the index is a fraction of the table.
    Index(
        "ix_contact_attributes_key_value_num",
        "key",
        "value_num",
        postgresql_where=text("value_num IS NOT NULL"),
        sqlite_where=text("value_num IS NOT NULL"),
    ),
)

lists = Table(
    "lists",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("name", String(200), nullable=False, unique=True),
    Column("created_at", UTCDateTime, nullable=False, default=utcnow),
)

list_members = Table(
    "list_members",
    metadata,
    Column("list_id", Integer, ForeignKey("lists.id", ondelete="CASCADE"), primary_key=True),
    Column("contact_id", Integer, ForeignKey("contacts.id", ondelete="CASCADE"), primary_key=True),
    Column("added_at", UTCDateTime, nullable=False, default=utcnow),
    Index("ix_list_members_contact_id", "contact_id"),
)

suppressions = Table(
    "suppressions",
    metadata,
    # Keyed by address, not contact: a suppressed address stays suppressed across re-imports.
    Column("email", String(320), primary_key=True),
    Column("reason", String(40), nullable=False),
    Column("detail", Text),
    Column("campaign_id", Integer),
    Column("created_at", UTCDateTime, nullable=False, default=utcnow),
)

templates = Table(
    "templates",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("name", String(200), nullable=False, unique=True),
    Column("subject", Text, nullable=False),
    Column("html", Text, nullable=False),
    Column("text", Text),
    Column("version", Integer, nullable=False, default=1),
    Column("created_at", UTCDateTime, nullable=False, default=utcnow),
    Column("updated_at", UTCDateTime, nullable=False, default=utcnow),
)

campaigns = Table(
    "campaigns",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("name", String(200), nullable=False),
    Column("template_id", Integer, ForeignKey("templates.id"), nullable=False),
    Column("template_version", Integer, nullable=False),
    Column("segment", Text, nullable=False),
    Column("from_addr", String(400), nullable=False),
    Column("reply_to", String(400)),
    Column("status", String(20), nullable=False, default="draft"),
    Column("status_reason", Text),
    Column("snapshot_hash", String(64)),
    Column("send_at", UTCDateTime),
    Column("created_at", UTCDateTime, nullable=False, default=utcnow),
    Column("started_at", UTCDateTime),
    Column("finished_at", UTCDateTime),
    # Tracking (opens, clicks, unsubscribe links) and where its server answers.
    Column("tracking", Boolean, nullable=False, default=True),
    Column("tracking_base_url", String(400)),
    # Sending window in the recipients' local time, e.g. 09:00–20:00 Asia/Tokyo.
    Column("timezone", String(64), nullable=False, default="Asia/Tokyo"),
    Column("window_start", String(5)),
    Column("window_end", String(5)),
    # A/B test: the seed of the random assignment, the test fraction, metric and winner.
    Column("ab_seed", Integer),
    Column("ab_fraction", Float),
    Column("ab_metric", String(20)),
    Column("ab_winner", String(40)),
    # The claim on starting a draft (preflight + snapshot), so that one process does it: its
    # owner (``host:pid:nonce``, kept once started as who started it) and its expiry.
    Column("start_owner", String(64)),
    Column("start_claim_until", UTCDateTime),
)

campaign_variants = Table(
    "campaign_variants",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("campaign_id", Integer, ForeignKey("campaigns.id", ondelete="CASCADE"), nullable=False),
    Column("name", String(40), nullable=False),
    Column("template_id", Integer, ForeignKey("templates.id"), nullable=False),
    Column("template_version", Integer, nullable=False),
    # Overrides the template's subject for this variant when set.
    Column("subject", Text),
    UniqueConstraint("campaign_id", "name", name="uq_campaign_variants_campaign_id"),
)

#: Ledger states. ``sending`` rows belong to a live worker; ``unknown`` ones to a dead one.
LEDGER_STATES = ("queued", "sending", "sent", "deferred", "failed", "unknown")
#: States that keep a campaign from being finished.
PENDING_STATES = ("queued", "sending", "deferred")

messages = Table(
    "messages",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("campaign_id", Integer, ForeignKey("campaigns.id", ondelete="CASCADE"), nullable=False),
    Column("contact_id", Integer, ForeignKey("contacts.id"), nullable=False),
    Column("email", String(320), nullable=False),
    # queued -> sending -> sent | deferred | failed | unknown
    Column("state", String(16), nullable=False, default="queued"),
    Column("attempts", Integer, nullable=False, default=0),
    Column("message_id", String(255)),
    Column("smtp_code", Integer),
    Column("smtp_reply", Text),
    Column("next_attempt_at", UTCDateTime),
    Column("lease_owner", String(64)),
    Column("lease_expires_at", UTCDateTime),
    Column("sent_at", UTCDateTime),
    Column("updated_at", UTCDateTime, nullable=False, default=utcnow),
    Column("variant", String(40)),
    # The recipient's domain, copied at snapshot time for per-domain pacing and breakdowns.
    Column("domain", String(255)),
    UniqueConstraint("campaign_id", "contact_id", name="uq_messages_campaign_contact"),
    # Claims walk a campaign's queued rows in id order, and its due retries in time order:
    # either reads about as many rows as it takes, however many were sent (migration 0009).
    Index("ix_messages_campaign_state_id", "campaign_id", "state", "id"),
    Index("ix_messages_campaign_state_next", "campaign_id", "state", "next_attempt_at"),
    # Bounces are matched to ledger rows by Message-ID header, and by address through the
    # contact (contacts.email is unique). Partial: a snapshot inserts every row without a
    # Message-ID, and those never need finding by it (migration 0010).
    Index(
        "ix_messages_message_id",
        "message_id",
        sqlite_where=text("message_id IS NOT NULL"),
        postgresql_where=text("message_id IS NOT NULL"),
    ),
    Index("ix_messages_contact", "contact_id"),
)

links = Table(
    "links",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("campaign_id", Integer, ForeignKey("campaigns.id", ondelete="CASCADE"), nullable=False),
    # A click redirects only to a URL stored here for that campaign.
    Column("url", Text, nullable=False),
    Column("position", Integer, nullable=False),
    UniqueConstraint("campaign_id", "position", name="uq_links_campaign_id"),
)

events = Table(
    "events",
    metadata,
    Column("id", BigId, primary_key=True),
    Column("campaign_id", Integer, ForeignKey("campaigns.id", ondelete="CASCADE")),
    Column("message_id", Integer, ForeignKey("messages.id", ondelete="CASCADE")),
    Column("contact_id", Integer, ForeignKey("contacts.id")),
    # sent | bounce | open | click | unsubscribe | complaint | suppressed
    Column("type", String(20), nullable=False),
    Column("occurred_at", UTCDateTime, nullable=False, default=utcnow),
    Column("detail", JSON),
    Column("link_id", Integer, ForeignKey("links.id", ondelete="CASCADE")),
    Column("user_agent", Text),
    # A keyed hash of the client address, never the address itself.
    Column("ip_hash", String(64)),
    # Image proxies, prefetchers and link scanners: flagged, not dropped.
    Column("machine", Boolean, nullable=False, default=False),
    Index("ix_events_message_type", "message_id", "type"),
    Index("ix_events_campaign_occurred", "campaign_id", "occurred_at"),
    # Covering index of the analytics that still read events (per-recipient engagement is in
    # ``engagement``): the timeline counts each (type, machine) per period by range on
    # ``occurred_at``, the link table reads clicks' ``link_id`` and ``message_id``.
    Index(
        "ix_events_campaign_type_time",
        "campaign_id",
        "type",
        "machine",
        "occurred_at",
        "link_id",
        "message_id",
    ),
)

engagement = Table(
    "engagement",
    metadata,
    # One row per (campaign, ledger row) with engagement events, maintained by triggers on
    # ``events`` (see ``storage.engagement``): derived data, so no foreign keys to check on
    # every tracked open; the triggers remove a row when its events go.
    Column("campaign_id", Integer, primary_key=True),
    Column("message_id", Integer, primary_key=True),
    # Event counts: human and machine opens and clicks, bounces (any kind), soft bounces...
    Column("opens", Integer, nullable=False),
    Column("machine_opens", Integer, nullable=False),
    Column("clicks", Integer, nullable=False),
    Column("machine_clicks", Integer, nullable=False),
    Column("bounces", Integer, nullable=False),
    Column("soft_bounces", Integer, nullable=False),
    Column("unsubscribes", Integer, nullable=False),
    Column("complaints", Integer, nullable=False),
    # The first human open or click (a click proves an open), and the first human click.
    Column("first_open_at", UTCDateTime),
    Column("first_click_at", UTCDateTime),
    # The timeline counts first opens and clicks per period by range over these.
    Index("ix_engagement_first_open", "campaign_id", "first_open_at"),
    Index("ix_engagement_first_click", "campaign_id", "first_click_at"),
    # SQLite: the rows live in the primary key's B-tree, one lookup per ledger row.
    sqlite_with_rowid=False,
)

event_minutes = Table(
    "event_minutes",
    metadata,
    # Timeline events (open, click, unsubscribe) per campaign, type, machine flag and UTC
    # minute, maintained by triggers on ``events`` (see ``storage.event_minutes``): the
    # timeline sums minutes instead of counting every event. Derived data: no foreign keys.
    Column("campaign_id", Integer, primary_key=True),
    Column("type", String(20), primary_key=True),
    Column("machine", Boolean, primary_key=True),
    Column("minute", UTCDateTime, primary_key=True),
    Column("events", Integer, nullable=False),
    sqlite_with_rowid=False,
)

domain_pacing = Table(
    "domain_pacing",
    metadata,
    # Shared between workers: a domain that answered 421 / 4.7.x is slowed down for everyone.
    Column("domain", String(255), primary_key=True),
    Column("slow_until", UTCDateTime),
    Column("penalty", Integer, nullable=False, default=0),
    Column("last_reply", Text),
    Column("updated_at", UTCDateTime, nullable=False, default=utcnow),
)

bounce_rejects = Table(
    "bounce_rejects",
    metadata,
    # Inbound messages that could not be parsed as bounces: kept aside, never acted on.
    Column("id", Integer, primary_key=True),
    Column("source", Text, nullable=False),
    Column("reason", Text, nullable=False),
    Column("raw", LargeBinary),
    Column("received_at", UTCDateTime, nullable=False, default=utcnow),
)

inbound_bounces = Table(
    "inbound_bounces",
    metadata,
    # Every ingested bounce/complaint message once, whatever became of it: the hash of its
    # normalised raw bytes makes ingesting the same message twice a no-op.
    Column("id", Integer, primary_key=True),
    Column("sha256", String(64), nullable=False, unique=True),
    Column("source", Text, nullable=False),
    # hard | soft | complaint | unmatched | ignored | rejected
    Column("outcome", String(20), nullable=False),
    Column("message_id", Integer, ForeignKey("messages.id", ondelete="SET NULL")),
    # verp | message_id | recipient: how the bounce was tied to its ledger row
    Column("matched_by", String(20)),
    Column("received_at", UTCDateTime, nullable=False, default=utcnow),
)
