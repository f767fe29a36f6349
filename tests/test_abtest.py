"""A/B statistics checked against scipy/statsmodels, and the comparison on a real sent campaign."""

from __future__ import annotations

import math

import pandas as pd
import pytest
from scipy.stats import norm
from sqlalchemy import Engine, select
from statsmodels.stats.power import NormalIndPower
from statsmodels.stats.proportion import (
    confint_proportions_2indep,
    proportion_confint,
    proportion_effectsize,
    proportions_ztest,
)

import mailkit
from mailkit.analytics import (
    build_comparison_table,
    compare_variants,
    compute_minimum_detectable_effect,
    compute_two_proportion_ztest,
    compute_wilson_interval,
    load_dashboard,
    record_events,
    render_verdict,
)
from mailkit.storage.schema import messages
from mailkit.variants import add_variant, assign_variants, save_ab_test

PAIRS = [(12, 120, 30, 120), (0, 50, 3, 50), (45, 1000, 60, 1000), (5, 5, 3, 9), (7, 300, 2, 80)]


@pytest.mark.parametrize(("x", "n"), [(0, 10), (10, 10), (3, 7), (120, 1000), (1, 1), (57, 613)])
def test_wilson_interval_matches_statsmodels(x: int, n: int) -> None:
    expected = proportion_confint(x, n, alpha=0.05, method="wilson")
    assert compute_wilson_interval(x, n) == pytest.approx(expected, abs=1e-12)
    expected90 = proportion_confint(x, n, alpha=0.10, method="wilson")
    assert compute_wilson_interval(x, n, confidence=0.90) == pytest.approx(expected90, abs=1e-12)


@pytest.mark.parametrize(("x1", "n1", "x2", "n2"), PAIRS)
def test_two_proportion_ztest_matches_statsmodels_and_scipy(
    x1: int, n1: int, x2: int, n2: int
) -> None:
    z, p = compute_two_proportion_ztest(x1, n1, x2, n2)
    sm_z, sm_p = proportions_ztest([x2, x1], [n2, n1])  # variant minus control, pooled
    assert z == pytest.approx(sm_z, rel=1e-9)
    assert p == pytest.approx(sm_p, rel=1e-9)
    assert p == pytest.approx(2 * norm.sf(abs(z)), rel=1e-9)


def test_undefined_tests_are_nan_not_errors() -> None:
    assert all(math.isnan(v) for v in compute_two_proportion_ztest(0, 10, 0, 10))
    assert all(math.isnan(v) for v in compute_two_proportion_ztest(3, 0, 1, 10))
    assert all(math.isnan(v) for v in compute_wilson_interval(0, 0))
    assert math.isnan(compute_minimum_detectable_effect(0.1, 0, 10))
    assert math.isnan(compute_minimum_detectable_effect(0.99, 3, 3))  # beyond 100 %


@pytest.mark.parametrize(
    ("baseline", "n1", "n2"),
    [(0.05, 1000, 1000), (0.10, 120, 120), (0.02, 5000, 2500), (0.3, 80, 95)],
)
def test_minimum_detectable_effect_matches_statsmodels_power(
    baseline: float, n1: int, n2: int
) -> None:
    mde = compute_minimum_detectable_effect(baseline, n1, n2, alpha=0.05, power=0.8)
    h = NormalIndPower().solve_power(
        effect_size=None, nobs1=n1, alpha=0.05, power=0.8, ratio=n2 / n1
    )
    expected = math.sin(math.asin(math.sqrt(baseline)) + h / 2) ** 2 - baseline
    assert mde == pytest.approx(expected, rel=1e-4)
    # And the defining property: that lift is found with 80 % power.
    power = NormalIndPower().power(
        proportion_effectsize(baseline + mde, baseline), nobs1=n1, alpha=0.05, ratio=n2 / n1
    )
    assert power == pytest.approx(0.8, abs=1e-4)


@pytest.mark.parametrize(("x1", "n1", "x2", "n2"), PAIRS[:3])
def test_comparison_table_matches_statsmodels(x1: int, n1: int, x2: int, n2: int) -> None:
    counts = pd.DataFrame({"delivered": [n1, n2], "successes": [x1, x2]}, index=["A", "B"])
    table = build_comparison_table(counts)
    b = table.loc["B"]
    assert b["rate"] == pytest.approx(x2 / n2 * 100)
    low, high = proportion_confint(x2, n2, method="wilson")
    assert (b["ci_low"], b["ci_high"]) == pytest.approx((low * 100, high * 100))
    d_low, d_high = confint_proportions_2indep(x2, n2, x1, n1, method="wald", compare="diff")
    assert (b["diff_low"], b["diff_high"]) == pytest.approx((d_low * 100, d_high * 100))
    assert b["p_value"] == pytest.approx(proportions_ztest([x2, x1], [n2, n1])[1])
    assert bool(b["significant"]) == (b["p_value"] < 0.05)
    assert math.isnan(table.loc["A", "p_value"]) and not table.loc["A", "significant"]


def test_verdicts_say_plainly_what_is_and_is_not_significant() -> None:
    def verdict(*rows: tuple[int, int]) -> str:
        names = [chr(ord("A") + i) for i in range(len(rows))]
        counts = pd.DataFrame(rows, columns=["delivered", "successes"], index=names)
        return render_verdict(build_comparison_table(counts), "click rate", True, 0.05)

    significant = verdict((120, 12), (120, 30))
    assert "statistically significant — B is higher (better)" in significant
    assert "NOT" not in significant
    not_significant = verdict((120, 12), (120, 15))
    assert "NOT statistically significant" in not_significant
    assert "may well be chance" in not_significant
    assert "only differences of about" in not_significant
    assert "Not enough data" in verdict((120, 12), (0, 0))
    assert "No click rate events" in verdict((120, 0), (120, 0))
    assert "tested against A at α = 0.025" in verdict((500, 50), (500, 52), (500, 80))


def test_compare_variants_on_a_really_sent_campaign(db: Engine) -> None:
    people = 240
    mailkit.import_contacts(
        db,
        pd.DataFrame(
            {
                "email": [f"u{i:03d}@example.jp" for i in range(people)],
                "gender": ["F" if i % 2 else "M" for i in range(people)],
            }
        ),
    )
    mailkit.save_template(db, "base", subject="春のご案内", html="<p>{{ email }}</p>")
    mailkit.save_template(db, "coupon", subject="クーポン", html="<p>{{ email }}</p>")
    campaign = mailkit.create_campaign(
        db, "ab", template="base", segment="", from_addr="news@shop.example.jp"
    )
    add_variant(db, campaign.id, "A", template="base")
    add_variant(db, campaign.id, "B", template="coupon")
    mailkit.snapshot_campaign(db, campaign.id)
    assert assign_variants(db, campaign.id, seed=11) == {"A": 120, "B": 120}
    with mailkit.Sink() as sink:
        assert mailkit.send_campaign(db, campaign.id, sink.url).status == "finished"
    with db.connect() as conn:
        rows = conn.execute(
            select(messages.c.id, messages.c.variant)
            .where(messages.c.campaign_id == campaign.id)
            .order_by(messages.c.id)
        ).all()
    by_variant = {v: [r.id for r in rows if r.variant == v] for v in ("A", "B")}
    clicks = [(mid, False) for mid in by_variant["A"][:12]] + [
        (mid, False) for mid in by_variant["B"][:30]
    ]
    clicks += [(mid, True) for mid in by_variant["A"][50:90]]  # scanners: never counted
    opens = by_variant["A"][:40] + by_variant["B"][:44]
    record_events(
        db,
        [{"message_id": m, "type": "click", "machine": machine} for m, machine in clicks]
        + [{"message_id": m, "type": "open"} for m in opens],
    )

    result = compare_variants(db, campaign.id)  # clicks by default
    assert result.metric == "click" and result.control == "A"
    assert result.table[["delivered", "successes"]].astype(int).to_dict("index") == {
        "A": {"delivered": 120, "successes": 12},
        "B": {"delivered": 120, "successes": 30},
    }
    assert result.table.loc["B", "p_value"] == pytest.approx(
        proportions_ztest([30, 12], [120, 120])[1]
    )
    assert result.significant and result.winner == "B"
    assert "statistically significant" in result.verdict

    # Opens (clicks imply opens): A 40, B 44 of 120 — not a real difference.
    opened = compare_variants(db, campaign.id, "open")
    assert opened.table["successes"].astype(int).to_list() == [40, 44]
    assert not opened.significant and opened.winner is None
    assert "NOT statistically significant" in opened.verdict

    dash = load_dashboard(db, campaign.id)
    bars = dash.figures["variants"].data[0]
    assert list(bars.x) == ["A", "B"]
    assert bars.y[1] == pytest.approx(25.0)
    assert bars.error_y.array[1] == pytest.approx(result.table.loc["B", "ci_high"] - 25.0)


def test_held_back_and_unsent_tests_give_a_clear_verdict(db: Engine) -> None:
    mailkit.import_contacts(
        db, pd.DataFrame({"email": [f"h{i:02d}@example.jp" for i in range(50)]})
    )
    mailkit.save_template(db, "base", subject="s", html="<p>x</p>")
    campaign = mailkit.create_campaign(
        db, "held", template="base", segment="", from_addr="news@shop.example.jp"
    )
    add_variant(db, campaign.id, "A", template="base")
    add_variant(db, campaign.id, "B", template="base", subject="別の件名")
    save_ab_test(db, campaign.id, fraction=0.4, metric="open", seed=5)
    mailkit.snapshot_campaign(db, campaign.id)
    assign_variants(db, campaign.id)
    result = compare_variants(db, campaign.id)
    assert result.metric == "open"  # the metric saved with the test
    assert list(result.table.index) == ["A", "B"]
    assert "Not enough data" in result.verdict
    assert any("30 recipients are held back" in n for n in result.notes)
    assert any("still sending" in n for n in result.notes)
    page_notes = load_dashboard(db, campaign.id).notes
    assert any("held back" in n for n in page_notes)
