"""The per-campaign delivery report.

Definitions (the same words appear in the CLI and the dashboards):

- ``recipients``  ledger rows: everyone the campaign was snapshotted for.
- ``accepted``    messages the SMTP server accepted (250).
- ``rejected``    messages the SMTP server refused permanently (5xx) for that recipient.
- ``expired``     messages given up after their retries ran out (4xx for too long).
- ``sent``        messages with a final outcome: accepted + rejected + expired.
- ``bounced``     sent messages that did not reach the recipient: permanent SMTP rejections,
                  expired retries, and hard bounces reported later by delivery status
                  notifications (``hard_bounces`` in the metrics), once per message.
- ``delivered``   accepted messages without a hard bounce (= sent − bounced).
- ``deliverability`` (到達率) = (1 − bounced / sent) × 100; undefined (None) before anything
                  was sent.
- ``pending``     queued + sending + deferred: still to be decided.
- ``unknown``     in flight when a worker died; not re-sent unless the operator asks.

These counts come from ``metrics.load_metrics`` (the one place they are defined); engagement
metrics (opens, clicks, ...) and their rates are there too.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import pandas as pd
from sqlalchemy import Engine

from ..campaigns import load_campaign
from ..dispatch.ledger import count_states
from .metrics import load_metrics

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
    expired: int = 0
    delivered: int = 0

    @property
    def pending(self) -> int:
        return self.queued + self.sending + self.deferred

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "pending": self.pending}


def build_report(db: Engine, campaign_id: int) -> CampaignReport:
    """Count a campaign's ledger and bounce events into its delivery report (see module doc)."""
    campaign = load_campaign(db, campaign_id)
    states = count_states(db, campaign_id)
    row = load_metrics(db, campaign_id).iloc[0]
    sent, bounced = int(row["sent"]), int(row["hard_bounces"])
    return CampaignReport(
        campaign_id=campaign.id,
        name=campaign.name,
        status=campaign.status,
        status_reason=campaign.status_reason,
        recipients=sum(states.values()),
        queued=states["queued"],
        sending=states["sending"],
        deferred=states["deferred"],
        accepted=int(row["accepted"]),
        rejected=int(row["rejected"]),
        sent=sent,
        bounced=bounced,
        failed=states["failed"],
        unknown=states["unknown"],
        deliverability=None if sent == 0 else round(float(row["deliverability"]), 2),
        expired=int(row["expired"]),
        delivered=int(row["delivered"]),
    )


def load_report_frame(db: Engine, campaign_ids: list[int]) -> pd.DataFrame:
    """Reports of several campaigns as one DataFrame, a row per campaign."""
    rows = [build_report(db, cid).to_dict() for cid in campaign_ids]
    return pd.DataFrame(rows).set_index("campaign_id") if rows else pd.DataFrame()
