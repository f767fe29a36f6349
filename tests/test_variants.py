"""A/B variants: definition, reproducible random assignment, hold-back and winner roll-out."""

from __future__ import annotations

import pandas as pd
import pytest
from sqlalchemy import Engine, func, select

import mailkit
from mailkit.errors import CampaignError, NotFoundError
from mailkit.storage.schema import campaigns, messages
from mailkit.variants import (
    add_variant,
    assign_variants,
    choose_winner,
    is_releasable,
    load_variants,
    save_ab_test,
)

FROM = "news@shop.example.jp"


def setup_campaign(db: Engine, people: int = 100, name: str = "ab") -> int:
    if not mailkit.load_contacts(db).shape[0]:
        frame = pd.DataFrame(
            {
                "email": [f"user{i:04d}@example.jp" for i in range(people)],
                "prefecture": ["東京都" if i % 3 else "大阪府" for i in range(people)],
            }
        )
        mailkit.import_contacts(db, frame)
        mailkit.save_template(db, "base", subject="春のご案内", html="<p>A</p>")
        mailkit.save_template(db, "coupon", subject="クーポン", html="<p>B</p>")
    campaign = mailkit.create_campaign(db, name, template="base", segment="", from_addr=FROM)
    return campaign.id


def assignment(db: Engine, campaign_id: int) -> dict[str, str | None]:
    with db.connect() as conn:
        return dict(
            conn.execute(
                select(messages.c.email, messages.c.variant).where(
                    messages.c.campaign_id == campaign_id
                )
            ).all()
        )


def test_add_variant_checks_its_campaign_template_and_name(db: Engine) -> None:
    cid = setup_campaign(db)
    a = add_variant(db, cid, "A", template="base")
    b = add_variant(db, cid, "B", template="coupon", subject="{{ name }}様 限定クーポン")
    assert [v.name for v in load_variants(db, cid)] == ["A", "B"]
    assert (a.template_version, b.subject) == (1, "{{ name }}様 限定クーポン")
    with pytest.raises(CampaignError, match="already has a variant 'A'"):
        add_variant(db, cid, "A", template="coupon")
    with pytest.raises(NotFoundError):
        add_variant(db, cid, "C", template="missing")
    with pytest.raises(CampaignError, match="1 to 40"):
        add_variant(db, cid, " ", template="base")
    solo = setup_campaign(db, name="solo")
    add_variant(db, solo, "A", template="base")
    mailkit.snapshot_campaign(db, solo)
    with pytest.raises(CampaignError, match="at least two"):
        assign_variants(db, solo)
    with pytest.raises(CampaignError, match="no ledger yet"):
        assign_variants(db, cid, seed=1)
    mailkit.snapshot_campaign(db, cid)
    with pytest.raises(CampaignError, match="only be added to a draft"):
        add_variant(db, cid, "C", template="base")


def test_assignment_is_random_balanced_and_reproducible_from_the_seed(db: Engine) -> None:
    first, second, third = (setup_campaign(db, name=n) for n in ("one", "two", "three"))
    for cid in (first, second, third):
        add_variant(db, cid, "A", template="base")
        add_variant(db, cid, "B", template="coupon")
        mailkit.snapshot_campaign(db, cid)
    counts = assign_variants(db, first, seed=20260401)
    assert counts == {"A": 50, "B": 50}
    assign_variants(db, second, seed=20260401)
    assign_variants(db, third, seed=7)
    one, two, three = (assignment(db, c) for c in (first, second, third))
    assert one == two  # the same seed on the same recipients: the same assignment
    assert one != three
    # Random, not alternating by contact order: both variants appear in both prefectures.
    ordered = [one[f"user{i:04d}@example.jp"] for i in range(100)]
    assert ordered != ["A", "B"] * 50 and ordered != ["B", "A"] * 50
    with db.connect() as conn:
        assert (
            conn.execute(select(campaigns.c.ab_seed).where(campaigns.c.id == first)).scalar_one()
            == 20260401
        )
    with pytest.raises(CampaignError, match="already assigned"):
        assign_variants(db, first, seed=1)


def test_a_test_fraction_holds_the_rest_back_until_a_winner(db: Engine) -> None:
    cid = setup_campaign(db)
    add_variant(db, cid, "A", template="base")
    add_variant(db, cid, "B", template="coupon")
    save_ab_test(db, cid, fraction=0.2, metric="click")  # settings saved on the draft
    mailkit.snapshot_campaign(db, cid)
    counts = assign_variants(db, cid)  # uses them; draws and records a seed
    assert counts == {"A": 10, "B": 10, None: 80}
    with db.connect() as conn:
        seed, fraction = conn.execute(
            select(campaigns.c.ab_seed, campaigns.c.ab_fraction).where(campaigns.c.id == cid)
        ).one()
        releasable = conn.execute(
            select(func.count()).where(messages.c.campaign_id == cid, is_releasable())
        ).scalar_one()
    assert seed is not None and fraction == pytest.approx(0.2)
    assert releasable == 20  # the runner may send the test recipients only

    with pytest.raises(NotFoundError):
        choose_winner(db, cid, "Z")
    assert choose_winner(db, cid, "B") == 80
    assert choose_winner(db, cid, "B") == 0  # idempotent
    with pytest.raises(CampaignError, match="already rolled out variant 'B'"):
        choose_winner(db, cid, "A")
    final = assignment(db, cid)
    assert sum(v == "B" for v in final.values()) == 90 and None not in final.values()
    with db.connect() as conn:
        releasable = conn.execute(
            select(func.count()).where(messages.c.campaign_id == cid, is_releasable())
        ).scalar_one()
    assert releasable == 100


def test_bad_settings_are_refused(db: Engine) -> None:
    cid = setup_campaign(db)
    with pytest.raises(CampaignError, match="fraction"):
        save_ab_test(db, cid, fraction=1.5)
    with pytest.raises(CampaignError, match="unknown A/B metric"):
        save_ab_test(db, cid, metric="revenue")
    add_variant(db, cid, "A", template="base")
    add_variant(db, cid, "B", template="coupon")
    mailkit.snapshot_campaign(db, cid)
    with pytest.raises(CampaignError, match="cannot cover 2 variants"):
        assign_variants(db, cid, seed=3, fraction=0.01)
