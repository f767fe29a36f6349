"""Shared by tests/test_bounces*.py: a campaign really sent to a Sink, and fixture rendering."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pandas as pd
from sqlalchemy import Engine, select

from mailkit import create_campaign, import_contacts, save_template, send_campaign
from mailkit.bounces import build_verp_address
from mailkit.sink import Sink
from mailkit.storage.schema import messages
from mailkit.tracking.tokens import Keyring

FIXTURES = Path(__file__).parent / "data" / "bounces"
DOMAIN = "shop.example.jp"
RECIPIENTS = [
    "hanako.yamada@example.jp",
    "taro.sato@example.co.jp",
    "kenji.tanaka@contoso.onmicrosoft.com",
    "misaki.kato@gmail.com",
    "yui.suzuki@docomo.ne.jp",
    "sakura.ito@ezweb.ne.jp",
    "daiki.kobayashi@yahoo.co.jp",
    "aoi.watanabe@example.ne.jp",
]


@dataclass(frozen=True)
class Sent:
    """One ledger row of a message really sent."""

    row_id: int
    campaign_id: int
    email: str
    message_id: str


def add_contacts(db: Engine, emails: list[str] = RECIPIENTS) -> None:
    frame = pd.DataFrame({"email": emails, "name": [e.split("@")[0] for e in emails]})
    frame["batch"] = "spring"
    import_contacts(db, frame)
    save_template(
        db,
        "spring",
        subject="{{ name }}様へ 春のご案内",
        html="<p>{{ name }} 様、春のご案内です。</p>",
    )


def send_spring(db: Engine, name: str = "春") -> dict[str, Sent]:
    """Create and send a campaign to every contact not suppressed; its ledger rows by address."""
    campaign = create_campaign(
        db, name, template="spring", segment="batch == 'spring'", from_addr=f"news@{DOMAIN}"
    )
    with Sink() as sink:
        send_campaign(db, campaign.id, sink.url)
    with db.connect() as conn:
        rows = conn.execute(
            select(messages.c.id, messages.c.email, messages.c.message_id, messages.c.state).where(
                messages.c.campaign_id == campaign.id
            )
        ).all()
    assert all(r.state == "sent" for r in rows)
    return {r.email: Sent(r.id, campaign.id, r.email, r.message_id) for r in rows}


def render_fixture(
    name: str, sent: Sent | None, keyring: Keyring | None, *, verp: str | None = None
) -> bytes:
    """A fixture with its placeholders filled for ``sent`` (VERP built from its ledger row)."""
    raw = (FIXTURES / name).read_bytes()
    if verp is None:
        verp = (
            build_verp_address(keyring, sent.row_id, DOMAIN)
            if sent is not None and keyring is not None
            else f"bounces@{DOMAIN}"
        )
    values = {
        b"{{VERP}}": verp.encode(),
        b"{{RCPT}}": (sent.email if sent else "nobody@example.org").encode(),
        b"{{MESSAGE_ID}}": (sent.message_id if sent else "<none@example.org>").encode(),
    }
    for placeholder, value in values.items():
        raw = raw.replace(placeholder, value)
    return raw
