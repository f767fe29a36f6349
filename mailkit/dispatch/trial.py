"""Trying a campaign without sending it: a dry run to a folder, and a test send to one address.

Neither touches the ledger or the campaign's status: a dry run renders, builds and signs every
recipient's message exactly as a real send would and writes them as ``.eml`` files; a test send
mails one recipient's message (with "[TEST] " before the subject) to an address of your
choosing.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, select

from ..campaigns import load_campaign
from ..dkim import DKIMSigner
from ..errors import AddressError, CampaignError, TemplateError
from ..segments import fetch_members
from ..storage import connect_for_reading
from ..storage.schema import messages
from ..templates import PreflightFailure
from .ledger import LedgerRow, fetch_contact_contexts
from .pipeline import Tracker
from .runner import prepare_message_factory
from .transport import Outcome, SMTPConnection, parse_smtp_url

__all__ = ["DryRun", "save_dry_run", "send_campaign_test", "send_campaign_test_async"]

_UNSAFE_NAME = re.compile(r"[^A-Za-z0-9@._+-]")


@dataclass(frozen=True)
class DryRun:
    """What ``save_dry_run`` wrote: the folder, the files, and the recipients that failed."""

    folder: Path
    files: tuple[Path, ...]
    failures: tuple[PreflightFailure, ...]

    def to_dict(self) -> dict[str, Any]:
        return {
            "folder": str(self.folder),
            "written": len(self.files),
            "failures": [
                {"contact_id": f.contact_id, "email": f.email, "error": f.error}
                for f in self.failures
            ],
        }


def _recipients(
    db: Engine, campaign_id: int, status: str, segment: str, limit: int | None
) -> list[LedgerRow]:
    """The ledger's first ``limit`` rows once started (with their variants), else the
    segment's first ``limit`` members (all with ``limit`` None)."""
    if status != "draft":
        m = messages.c
        query = (
            select(m.id, m.contact_id, m.email, m.attempts, m.state, m.variant, m.domain)
            .where(m.campaign_id == campaign_id)
            .order_by(m.id)
        )
        with connect_for_reading(db) as conn:
            rows = conn.execute(query if limit is None else query.limit(limit)).all()
        return [LedgerRow(*row) for row in rows]
    members = fetch_members(db, segment, limit=limit)
    return [
        LedgerRow(0, int(cid), str(email), 0)
        for cid, email in zip(members["id"], members["email"], strict=True)
    ]


def save_dry_run(
    db: Engine,
    campaign_id: int,
    folder: str | Path,
    *,
    dkim: DKIMSigner | bool = True,
    tracker: Tracker | None = None,
    limit: int | None = None,
) -> DryRun:
    """Render, build and sign every recipient's message into ``folder`` as ``.eml`` files;
    send nothing and leave the ledger and the campaign untouched.

    A draft's recipients are its segment's members today (rendered with the campaign's own
    template, since A/B variants are assigned at the start); a started campaign's are its
    ledger rows with their variants. Recipients that cannot be rendered are listed in
    ``failures`` instead of raising.
    """
    if limit is not None and (isinstance(limit, bool) or limit < 0):
        raise ValueError(f"limit must be a non-negative int or None, not {limit!r}")
    campaign = load_campaign(db, campaign_id)
    factory = prepare_message_factory(db, campaign, dkim=dkim, tracker=tracker)
    rows = _recipients(db, campaign_id, campaign.status, campaign.segment, limit)
    contexts = fetch_contact_contexts(db, [r.contact_id for r in rows])
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    files: list[Path] = []
    failures: list[PreflightFailure] = []
    for number, row in enumerate(rows, start=1):
        try:
            outgoing = factory.build(row, contexts.get(row.contact_id, {"email": row.email}))
        except (TemplateError, AddressError, CampaignError) as exc:
            failures.append(PreflightFailure(row.contact_id, row.email, str(exc)))
            continue
        path = out / f"{number:06d}-{_UNSAFE_NAME.sub('_', row.email)}.eml"
        path.write_bytes(outgoing.data)
        files.append(path)
    return DryRun(out, tuple(files), tuple(failures))


async def send_campaign_test_async(
    db: Engine,
    campaign_id: int,
    to_addr: str,
    smtp_url: str,
    *,
    contact: int | str | None = None,
    dkim: DKIMSigner | bool = True,
    tracker: Tracker | None = None,
) -> Outcome:
    """Send one recipient's message to ``to_addr`` ("[TEST] " before the subject).

    The message is rendered with the data of ``contact`` (an id or an email address), by
    default the campaign's first recipient. Nothing is recorded in the ledger. Returns the
    server's outcome; a server that cannot be used raises SMTPDeliveryError.
    """
    campaign = load_campaign(db, campaign_id)
    factory = prepare_message_factory(db, campaign, dkim=dkim, tracker=tracker)
    # Without a chosen contact the first recipient will do: no need to read them all.
    first = 1 if contact is None else None
    rows = _recipients(db, campaign_id, campaign.status, campaign.segment, first)
    if contact is not None:
        rows = [r for r in rows if contact in (r.contact_id, r.email)]
    if not rows:
        raise CampaignError(
            f"campaign {campaign_id} has no recipient {contact!r} to render the test with"
            if contact is not None
            else f"campaign {campaign_id} has no recipients to render a test message for"
        )
    sample = rows[0]
    context = fetch_contact_contexts(db, [sample.contact_id]).get(sample.contact_id, {})
    row = LedgerRow(0, sample.contact_id, to_addr, 0, variant=sample.variant)
    outgoing = factory.build(row, context, subject_prefix="[TEST] ")
    async with SMTPConnection(parse_smtp_url(smtp_url)) as connection:
        return await connection.send(outgoing.envelope_from, to_addr, outgoing.data, crlf=True)


def send_campaign_test(
    db: Engine, campaign_id: int, to_addr: str, smtp_url: str, **options: Any
) -> Outcome:
    """Blocking ``send_campaign_test_async``."""
    from .._aio import run_sync

    return run_sync(send_campaign_test_async(db, campaign_id, to_addr, smtp_url, **options))
