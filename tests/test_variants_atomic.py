"""A/B variants are assigned in the snapshot's own transaction: a failure while writing them
leaves neither the ledger nor the assignment, and the saved seed and test fraction hold.

The failure is the database's: a trigger that refuses any write of ``messages.variant``.
"""

from __future__ import annotations

from collections.abc import Iterator

import pandas as pd
import pytest
from sqlalchemy import Engine, func, select, text
from sqlalchemy.exc import DBAPIError

import mailkit
from mailkit.campaigns import load_campaign
from mailkit.dispatch.starting import load_start_claim
from mailkit.storage.schema import campaigns, messages
from mailkit.variants import add_variant, assign_variants, save_ab_test

FROM = "news@shop.example.jp"
PEOPLE = 40
REFUSED = "variant writes refused by the test trigger"


pytestmark = pytest.mark.usefixtures("no_settings_from_env")


def ab_campaign(db: Engine, name: str, *, seed: int, fraction: float | None) -> int:
    if not mailkit.load_contacts(db).shape[0]:
        emails = [f"ab{i:03d}@example.jp" for i in range(PEOPLE)]
        mailkit.import_contacts(db, pd.DataFrame({"email": emails}))
        mailkit.save_template(db, "base", subject="春のご案内", html="<p>{{ email }}</p>")
        mailkit.save_template(db, "coupon", subject="クーポン", html="<p>{{ email }} 様</p>")
    campaign = mailkit.create_campaign(db, name, template="base", segment="", from_addr=FROM)
    add_variant(db, campaign.id, "A", template="base")
    add_variant(db, campaign.id, "B", template="coupon")
    save_ab_test(db, campaign.id, fraction=fraction, seed=seed)
    return campaign.id


@pytest.fixture
def refusing(db: Engine) -> Iterator[Engine]:
    """``db`` with a trigger that aborts any statement writing a variant into the ledger."""
    if db.dialect.name == "sqlite":
        create = [
            "CREATE TRIGGER mk_refuse_variant BEFORE UPDATE OF variant ON messages "
            f"WHEN NEW.variant IS NOT NULL BEGIN SELECT RAISE(ABORT, '{REFUSED}'); END"
        ]
        drop = ["DROP TRIGGER mk_refuse_variant"]
    else:
        create = [
            "CREATE FUNCTION mk_refuse_variant() RETURNS trigger LANGUAGE plpgsql AS "
            f"$$ BEGIN RAISE EXCEPTION '{REFUSED}'; END $$",
            "CREATE TRIGGER mk_refuse_variant BEFORE UPDATE OF variant ON messages "
            "FOR EACH ROW WHEN (NEW.variant IS NOT NULL) EXECUTE FUNCTION mk_refuse_variant()",
        ]
        drop = ["DROP TRIGGER mk_refuse_variant ON messages", "DROP FUNCTION mk_refuse_variant()"]
    with db.begin() as conn:
        for statement in create:
            conn.execute(text(statement))
    yield db
    with db.begin() as conn:
        for statement in drop:
            conn.execute(text(statement))


def ledger(db: Engine, campaign_id: int) -> dict[str, str | None]:
    m = messages.c
    with db.connect() as conn:
        rows = conn.execute(select(m.email, m.variant).where(m.campaign_id == campaign_id)).all()
    return dict(rows)


def stored_seed(db: Engine, campaign_id: int) -> tuple[int | None, float | None]:
    c = campaigns.c
    with db.connect() as conn:
        row = conn.execute(select(c.ab_seed, c.ab_fraction).where(c.id == campaign_id)).one()
    return row.ab_seed, row.ab_fraction


def test_a_failed_variant_write_leaves_neither_snapshot_nor_assignment(refusing: Engine) -> None:
    db = refusing
    cid = ab_campaign(db, "atomic", seed=20260401, fraction=0.5)
    with mailkit.Sink() as sink:
        with pytest.raises(DBAPIError, match=REFUSED):
            mailkit.send_campaign(db, cid, sink.url)
        assert sink.count == 0
        with pytest.raises(DBAPIError, match=REFUSED):
            mailkit.snapshot_campaign(db, cid, assign_variants=True)
    # Both attempts rolled back whole: a draft with no ledger, the settings as saved.
    assert load_campaign(db, cid).status == "draft"
    assert ledger(db, cid) == {}
    assert stored_seed(db, cid) == (20260401, pytest.approx(0.5))
    claim = load_start_claim(db, cid)
    assert (claim.owner, claim.until) == (None, None)  # the failed start let go of its claim

    # Without the variant column, a snapshot alone goes through: the trigger is what failed.
    plain = mailkit.create_campaign(db, "plain", template="base", segment="", from_addr=FROM)
    assert mailkit.snapshot_campaign(db, plain.id, assign_variants=True) == PEOPLE


def test_send_assigns_at_the_snapshot_with_the_saved_seed_and_fraction(db: Engine) -> None:
    sent = ab_campaign(db, "sent", seed=7, fraction=0.5)
    by_hand = ab_campaign(db, "by hand", seed=7, fraction=0.5)
    mailkit.snapshot_campaign(db, by_hand)
    assert ledger(db, by_hand) == dict.fromkeys(ledger(db, by_hand))  # not assigned yet
    assert assign_variants(db, by_hand) == {"A": 10, "B": 10, None: 20}
    with mailkit.Sink() as sink:
        result = mailkit.send_campaign(db, sent, sink.url)
        # Only the test half went out; the rest waits for a winner.
        assert result.status == "sending" and sink.count == PEOPLE // 2
    assigned = ledger(db, sent)
    assert assigned == ledger(db, by_hand)  # the same seed on the same recipients
    assert stored_seed(db, sent) == (7, pytest.approx(0.5))
    with db.connect() as conn:
        untouched = conn.execute(
            select(func.count()).where(
                messages.c.campaign_id == sent,
                messages.c.variant.is_(None),
                messages.c.state == "queued",
            )
        ).scalar_one()
    assert untouched == PEOPLE // 2
