"""Dispatch: the outbox ledger, the SMTP transport, pacing, the message pipeline, the runner
and the long-running workers."""

from .ledger import LedgerRow, count_states
from .pacing import (
    DEFAULT_PACING,
    Clock,
    DomainPacer,
    PacingRule,
    SafetyStop,
    SystemClock,
    retry_delay,
    unpaced_rules,
)
from .pipeline import Tracker, load_dkim_signer
from .runner import (
    SendResult,
    Starting,
    pause_campaign,
    resume_campaign,
    send_campaign,
    send_campaign_async,
    start_campaign,
    start_campaign_async,
)
from .transport import (
    Outcome,
    SMTPConnection,
    SMTPTarget,
    classify_reply,
    parse_smtp_url,
    ssl_context_for,
)
from .trial import save_dry_run, send_campaign_test
from .worker import WorkerSummary, run_worker, run_worker_async

__all__ = [
    "DEFAULT_PACING",
    "Clock",
    "DomainPacer",
    "LedgerRow",
    "Outcome",
    "PacingRule",
    "SMTPConnection",
    "SMTPTarget",
    "SafetyStop",
    "SendResult",
    "Starting",
    "SystemClock",
    "Tracker",
    "WorkerSummary",
    "classify_reply",
    "count_states",
    "load_dkim_signer",
    "parse_smtp_url",
    "pause_campaign",
    "resume_campaign",
    "retry_delay",
    "run_worker",
    "run_worker_async",
    "save_dry_run",
    "send_campaign",
    "send_campaign_async",
    "send_campaign_test",
    "ssl_context_for",
    "start_campaign",
    "start_campaign_async",
    "unpaced_rules",
]
