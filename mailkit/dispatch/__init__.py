"""Dispatch: the outbox ledger, the SMTP transport and the send runner."""

from .ledger import LedgerRow, count_states
from .runner import SendResult, retry_delay, send_campaign, send_campaign_async
from .transport import (
    Outcome,
    SMTPConnection,
    SMTPTarget,
    classify_reply,
    parse_smtp_url,
    ssl_context_for,
)

__all__ = [
    "LedgerRow",
    "Outcome",
    "SMTPConnection",
    "SMTPTarget",
    "SendResult",
    "classify_reply",
    "count_states",
    "parse_smtp_url",
    "retry_delay",
    "send_campaign",
    "send_campaign_async",
    "ssl_context_for",
]
