"""Comparing A/B variants honestly: intervals, a two-proportion test, and the detectable effect.

The rate of a variant is a proportion of its *delivered* recipients (clickers / delivered for
the default metric ``click``; see ``metrics`` for the counts). The statistics are the textbook
ones, computed with the standard library's ``statistics.NormalDist``:

- **Wilson score interval** for each rate: (p̂ + z²/2n ± z·√(p̂(1−p̂)/n + z²/4n²)) / (1 + z²/n).
- **Two-proportion z-test** (pooled, two-sided) of each variant against the control (the
  first variant): z = (p̂₂ − p̂₁) / √(p̂(1−p̂)(1/n₁ + 1/n₂)) with p̂ the pooled rate.
- **Wald interval of the difference** p̂₂ − p̂₁ ± z·√(p̂₁(1−p̂₁)/n₁ + p̂₂(1−p̂₂)/n₂).
- **Minimum detectable effect**: the smallest increase over the control's rate that a test
  with these sample sizes detects with the given power, via Cohen's h (arcsine):
  h = (z₁₋α/₂ + z_power)·√(1/n₁ + 1/n₂), p₂ = sin(asin √p₁ + h/2)².

With more than two variants each is compared to the control at α / (k − 1) (Bonferroni).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from statistics import NormalDist

import pandas as pd
from sqlalchemy import Engine, select

from ..campaigns import load_campaign
from ..storage.schema import campaigns
from .breakdowns import UNASSIGNED, load_metrics_by_variant
from .reading import connect_analytics

__all__ = [
    "VariantComparison",
    "build_comparison_table",
    "build_variant_comparison",
    "compare_variants",
    "compute_minimum_detectable_effect",
    "compute_two_proportion_ztest",
    "compute_wilson_interval",
    "load_ab_metric",
    "render_verdict",
]

_NORMAL = NormalDist()
#: A/B metric → (count column of the metric frames, label, higher is better).
_METRICS: dict[str, tuple[str, str, bool]] = {
    "click": ("clickers", "click rate", True),
    "open": ("openers", "open rate", True),
    "unsubscribe": ("unsubscribes", "unsubscribe rate", False),
    "complaint": ("complaints", "complaint rate", False),
}


def compute_wilson_interval(
    successes: int, trials: int, *, confidence: float = 0.95
) -> tuple[float, float]:
    """Wilson score interval of a proportion (as fractions); (nan, nan) when ``trials`` is 0."""
    if trials <= 0:
        return (math.nan, math.nan)
    z = _NORMAL.inv_cdf(1 - (1 - confidence) / 2)
    p = successes / trials
    denominator = 1 + z * z / trials
    centre = (p + z * z / (2 * trials)) / denominator
    half = z / denominator * math.sqrt(p * (1 - p) / trials + z * z / (4 * trials * trials))
    return (max(0.0, centre - half), min(1.0, centre + half))


def compute_two_proportion_ztest(
    successes1: int, trials1: int, successes2: int, trials2: int
) -> tuple[float, float]:
    """Pooled two-sided z-test of p₂ − p₁: (z, p-value); (nan, nan) when it is undefined.

    Undefined when a group is empty, or when the pooled rate is 0 or 1 (no variation at all).
    """
    if trials1 <= 0 or trials2 <= 0:
        return (math.nan, math.nan)
    pooled = (successes1 + successes2) / (trials1 + trials2)
    se = math.sqrt(pooled * (1 - pooled) * (1 / trials1 + 1 / trials2))
    if se == 0:
        return (math.nan, math.nan)
    z = (successes2 / trials2 - successes1 / trials1) / se
    return (z, 2 * _NORMAL.cdf(-abs(z)))


def compute_minimum_detectable_effect(
    baseline: float, trials1: int, trials2: int, *, alpha: float = 0.05, power: float = 0.8
) -> float:
    """Smallest increase over ``baseline`` (a fraction) detectable with these group sizes.

    Two-sided test at ``alpha`` with the given ``power``, by Cohen's h (see module doc).
    Returns an absolute difference in proportion; nan when a group is empty or no increase up
    to 100 % would be detected.
    """
    if trials1 <= 0 or trials2 <= 0 or not 0 <= baseline <= 1:
        return math.nan
    h = (_NORMAL.inv_cdf(1 - alpha / 2) + _NORMAL.inv_cdf(power)) * math.sqrt(
        1 / trials1 + 1 / trials2
    )
    angle = math.asin(math.sqrt(baseline)) + h / 2
    if angle > math.pi / 2:
        return math.nan
    return math.sin(angle) ** 2 - baseline


@dataclass(frozen=True)
class VariantComparison:
    """The outcome of ``compare_variants``.

    ``table`` has a row per variant (control first): ``delivered``, ``successes``, ``rate``,
    ``ci_low``, ``ci_high`` (Wilson), ``diff`` (vs the control), ``diff_low``/``diff_high``
    (Wald), ``z``, ``p_value``, ``mde`` (minimum detectable increase over the control) and
    ``significant``. Rates and differences are in percent / percentage points.
    """

    campaign_id: int
    metric: str
    label: str
    control: str | None
    alpha: float
    power: float
    table: pd.DataFrame
    verdict: str
    winner: str | None = None  # significantly best variant; None while undecided
    notes: tuple[str, ...] = field(default_factory=tuple)

    @property
    def significant(self) -> bool:
        return bool(self.table["significant"].any()) if len(self.table) else False


def load_ab_metric(db: Engine, campaign_id: int, metric: str | None = None) -> str:
    """``metric`` if given, else the one saved with the campaign's test, else ``click``."""
    if metric is None:
        with connect_analytics(db) as conn:
            stored = conn.execute(
                select(campaigns.c.ab_metric).where(campaigns.c.id == campaign_id)
            ).scalar_one()
        metric = stored or "click"
    if metric not in _METRICS:
        raise ValueError(f"unknown metric {metric!r}: use one of {', '.join(_METRICS)}")
    return metric


def build_comparison_table(
    counts: pd.DataFrame, *, alpha: float = 0.05, power: float = 0.8
) -> pd.DataFrame:
    """The statistics for a frame with ``delivered`` and ``successes`` per variant (control first).

    Pure: ``compare_variants`` feeds it from the database; tests feed it known numbers.
    """
    rows = []
    k = len(counts)
    level = alpha / max(k - 1, 1)
    z_level = _NORMAL.inv_cdf(1 - level / 2)
    n1, x1 = (int(counts["delivered"].iloc[0]), int(counts["successes"].iloc[0])) if k else (0, 0)
    p1 = x1 / n1 if n1 else math.nan
    for i, (name, row) in enumerate(counts.iterrows()):
        n, x = int(row["delivered"]), int(row["successes"])
        p = x / n if n else math.nan
        low, high = compute_wilson_interval(x, n, confidence=1 - alpha)
        out: dict[str, object] = {
            "variant": name,
            "delivered": n,
            "successes": x,
            "rate": p * 100,
            "ci_low": low * 100,
            "ci_high": high * 100,
        }
        if i == 0:
            out.update(diff=0.0, diff_low=math.nan, diff_high=math.nan, z=math.nan)
            out.update(p_value=math.nan, mde=math.nan, significant=False)
        else:
            z, p_value = compute_two_proportion_ztest(x1, n1, x, n)
            se = math.sqrt(p1 * (1 - p1) / n1 + p * (1 - p) / n) if n and n1 else math.nan
            diff = p - p1
            mde = compute_minimum_detectable_effect(p1, n1, n, alpha=level, power=power)
            out.update(
                diff=diff * 100,
                diff_low=(diff - z_level * se) * 100,
                diff_high=(diff + z_level * se) * 100,
                z=z,
                p_value=p_value,
                mde=mde * 100,
                significant=bool(p_value < level) if not math.isnan(p_value) else False,
            )
        rows.append(out)
    columns = [
        "variant", "delivered", "successes", "rate", "ci_low", "ci_high", "diff", "diff_low",
        "diff_high", "z", "p_value", "mde", "significant",
    ]  # fmt: skip
    return pd.DataFrame(rows, columns=columns).set_index("variant")


def _pct(value: float) -> str:
    return "n/a" if math.isnan(value) else f"{value:.2f} %"


def render_verdict(table: pd.DataFrame, label: str, higher_is_better: bool, alpha: float) -> str:
    """A plain-language reading of a comparison table (see ``build_comparison_table``)."""
    if len(table) < 2:
        return "Not an A/B test: fewer than two variants have recipients."
    empty = [str(n) for n, r in table.iterrows() if r["delivered"] == 0]
    if empty:
        return (
            f"Not enough data yet: no delivered messages for variant {', '.join(empty)}; "
            "nothing can be concluded."
        )
    if table["successes"].sum() == 0:
        return f"No {label} events in any variant yet: nothing to compare."
    control = str(table.index[0])
    level = alpha / (len(table) - 1)
    sentences = []
    for name, row in table.iloc[1:].iterrows():
        base = table.iloc[0]
        direction = "higher" if row["diff"] > 0 else "lower" if row["diff"] < 0 else "the same"
        better = (row["diff"] > 0) == higher_is_better
        pair = (
            f"{name}'s {label} ({_pct(row['rate'])}) vs {control}'s ({_pct(base['rate'])}): "
            f"{row['diff']:+.2f} points"
        )
        if math.isnan(row["p_value"]):
            sentences.append(f"{pair}; no test possible (no variation in either group).")
        elif row["significant"]:
            sentences.append(
                f"{pair}, p = {row['p_value']:.4f} < {level:.3g}: statistically significant — "
                f"{name} is {direction} ({'better' if better else 'worse'})."
            )
        else:
            mde = row["mde"]
            detect = (
                f"with {int(base['delivered']):,} and {int(row['delivered']):,} delivered, only "
                f"differences of about {mde:.2f} points or more would be detected reliably"
                if not math.isnan(mde)
                else "these samples are too small to detect any difference reliably"
            )
            sentences.append(
                f"{pair}, p = {row['p_value']:.4f} ≥ {level:.3g}: NOT statistically significant "
                f"— the difference may well be chance; {detect}."
            )
    if len(table) > 2:
        sentences.append(f"(Each variant is tested against {control} at α = {level:.3g}.)")
    return " ".join(sentences)


def _winner(table: pd.DataFrame, higher_is_better: bool) -> str | None:
    """The variant significantly better than the control, or the control if all are worse."""
    if len(table) < 2:
        return None
    others = table.iloc[1:]
    gain = others["diff"] if higher_is_better else -others["diff"]
    better = others[others["significant"] & (gain > 0)]
    if len(better):
        return str(gain[better.index].idxmax())
    if bool((others["significant"] & (gain < 0)).all()):
        return str(table.index[0])
    return None


def compare_variants(
    db: Engine,
    campaign_id: int,
    metric: str | None = None,
    *,
    alpha: float = 0.05,
    power: float = 0.8,
) -> VariantComparison:
    """Compare the campaign's variants on ``metric`` (click, open, unsubscribe, complaint).

    ``metric`` defaults to the one saved with the test, else ``click`` (opens are unreliable:
    image proxies open everything, blocked images hide real opens). Each variant's rate is
    successes / delivered with a Wilson interval; each is tested against the control (the
    first variant) with a two-proportion z-test; ``mde`` says what difference these sample
    sizes could detect (``alpha``, ``power``). The verdict says plainly when a difference is
    not significant. Held-back (unassigned) recipients are left out.
    """
    load_campaign(db, campaign_id)
    metric = load_ab_metric(db, campaign_id, metric)
    frame = load_metrics_by_variant(db, campaign_id)
    return build_variant_comparison(campaign_id, frame, metric, alpha=alpha, power=power)


def build_variant_comparison(
    campaign_id: int,
    by_variant: pd.DataFrame,
    metric: str = "click",
    *,
    alpha: float = 0.05,
    power: float = 0.8,
) -> VariantComparison:
    """The comparison of ``compare_variants`` from a frame shaped like
    ``load_metrics_by_variant`` (control first; an ``(unassigned)`` row is left out)."""
    if metric not in _METRICS:
        raise ValueError(f"unknown metric {metric!r}: use one of {', '.join(_METRICS)}")
    column, label, higher_is_better = _METRICS[metric]
    frame = by_variant
    notes = []
    if UNASSIGNED in frame.index:
        held = int(frame["recipients"].loc[UNASSIGNED])
        notes.append(f"{held} recipients are held back (no variant yet) and not compared")
        frame = frame.drop(index=UNASSIGNED)
    pending = int(frame["pending"].sum()) if len(frame) else 0
    if pending:
        notes.append(f"still sending: {pending} test recipients pending; results will change")
    counts = frame[["delivered"]].assign(successes=frame[column])
    table = build_comparison_table(counts, alpha=alpha, power=power)
    verdict = render_verdict(table, label, higher_is_better, alpha)
    return VariantComparison(
        campaign_id=campaign_id,
        metric=metric,
        label=label,
        control=str(table.index[0]) if len(table) else None,
        alpha=alpha,
        power=power,
        table=table,
        verdict=verdict,
        winner=_winner(table, higher_is_better),
        notes=tuple(notes),
    )
