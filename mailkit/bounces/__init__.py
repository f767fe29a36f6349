"""Bounces and complaints: VERP addresses, DSN/ARF parsing, policy, sources, SMTP listener."""

from .ingest import (
    BounceReject,
    IngestReport,
    count_bounce_rejects,
    ingest_bounces,
    ingest_message,
    load_bounce_rejects,
)
from .listener import BounceListener, run_bounce_listener, serve_bounce_listener
from .parse import ParsedBounce, RecipientStatus, parse_bounce
from .policy import BounceDecision, BouncePolicy, LedgerMatch, classify_status, decide_bounce
from .sources import (
    BounceSource,
    ImapSource,
    InboundMessage,
    LocalSource,
    open_source,
    register_source,
)
from .verp import VERP_PREFIX, build_verp_address, decode_verp

__all__ = [
    "VERP_PREFIX",
    "BounceDecision",
    "BounceListener",
    "BouncePolicy",
    "BounceReject",
    "BounceSource",
    "ImapSource",
    "InboundMessage",
    "IngestReport",
    "LedgerMatch",
    "LocalSource",
    "ParsedBounce",
    "RecipientStatus",
    "build_verp_address",
    "classify_status",
    "count_bounce_rejects",
    "decide_bounce",
    "decode_verp",
    "ingest_bounces",
    "ingest_message",
    "load_bounce_rejects",
    "open_source",
    "parse_bounce",
    "register_source",
    "run_bounce_listener",
    "serve_bounce_listener",
]
