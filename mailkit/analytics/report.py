"""The per-campaign delivery report.

Definitions (the same words appear in the CLI and the dashboards):

- ``recipients``  ledger rows: everyone the campaign was snapshotted for.
- ``accepted``    messages the SMTP server accepted (250).
- ``rejected``    messages the SMTP server refused permanently (5xx) for that recipient.
- ``sent``        messages that got a final answer from the server: accepted + rejected.
- ``bounced``     sent messages that did not reach the recipient: permanent SMTP rejections
                  plus hard bounces reported later by delivery status notifications.
- ``deliverability`` (到達率) = (1 − bounced / sent) × 100; undefined (None) before anything
                  was sent.
- ``pending``     queued + sending + deferred: still to be decided.
- ``unknown``     in flight when a worker died; not re-sent unless the operator asks.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import pandas as pd
from sqlalchemy import Engine, and_, distinct, func, select

from ..campaigns import load_campaign
from ..dispatch.ledger import count_states
from ..storage.schema import events, messages

__all__ = ["CampaignReport", "build_report", "load_report_frame"]


@dataclass(frozen=True)
class CampaignReport:
    campaign_id: int
    name: str
    status: str
    status_reason: str | None
    recipients: int
    queued: int
    sending: int
    deferred: int
    accepted: int
    rejected: int
    sent: int
    bounced: int
    failed: int
    unknown: int
    deliverability: float | None

    @property
    def pending(self) -> int:
        return self.queued + self.sending + self.deferred

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "pending": self.pending}


def build_report(db: Engine, campaign_id: int) -> CampaignReport:
    """Count a campaign's ledger and bounce events into its delivery report."""
    campaign = load_campaign(db, campaign_id)
    states = count_states(db, campaign_id)
    with db.connect() as conn:
        rejected = conn.execute(
            select(func.count()).where(
                messages.c.campaign_id == campaign_id,
                messages.c.state == "failed",
                messages.c.smtp_code >= 500,
            )
        ).scalar_one()
        # A message counts once however many bounce reports arrive for it; soft bounces
        # (deferrals) are not bounces until delivery is given up.
        bounced = conn.execute(
            select(func.count(distinct(events.c.message_id))).where(
                and_(
                    events.c.campaign_id == campaign_id,
                    events.c.type == "bounce",
                    events.c.message_id.is_not(None),
                )
            )
        ).scalar_one()
    accepted = states["sent"]
    sent = accepted + int(rejected)
    return CampaignReport(
        campaign_id=campaign.id,
        name=campaign.name,
        status=campaign.status,
        status_reason=campaign.status_reason,
        recipients=sum(states.values()),
        queued=states["queued"],
        sending=states["sending"],
        deferred=states["deferred"],
        accepted=accepted,
        rejected=int(rejected),
        sent=sent,
        bounced=int(bounced),
        failed=states["failed"],
        unknown=states["unknown"],
        deliverability=None if sent == 0 else round((1 - int(bounced) / sent) * 100, 2),
    )


def load_report_frame(db: Engine, campaign_ids: list[int]) -> pd.DataFrame:
    """Reports of several campaigns as one DataFrame, a row per campaign."""
    rows = [build_report(db, cid).to_dict() for cid in campaign_ids]
    return pd.DataFrame(rows).set_index("campaign_id") if rows else pd.DataFrame()
