"""A/B variants of a campaign: define them, assign them to recipients, roll out the winner.

A variant is a template (and optionally a subject) under a short name such as ``A`` or ``B``.
Assignment happens with the snapshot, in its transaction (``send_campaign`` does both, so a crash
leaves either neither or both), or later by ``assign_variants``, and is reproducible: the
recipients, ordered by contact id, are shuffled with ``random.Random(seed)`` and dealt to the
variants in turn, so the arms differ in size by at most one and the same seed on the same
ledger gives the same assignment. The seed is recorded in ``campaigns.ab_seed``.

With a test ``fraction`` only that share of the recipients gets a variant; the rest keep
``variant`` NULL and are *held back*: the runner does not send them (see ``is_releasable``)
until ``choose_winner`` gives them the winning variant.

Typical use::

    add_variant(db, cid, "A", template="spring")
    add_variant(db, cid, "B", template="spring", subject="{{ name }}様 限定クーポン")
    save_ab_test(db, cid, fraction=0.2)          # 20 % test first; the rest wait
    send_campaign(db, cid, smtp)                 # snapshot, assignment, sends the test
    compare_variants(db, cid)                    # ... hours later
    choose_winner(db, cid, "B"); send_campaign(db, cid, smtp)
"""

from __future__ import annotations

import random
import secrets
from dataclasses import dataclass

from sqlalchemy import (
    ColumnElement,
    Connection,
    Engine,
    bindparam,
    exists,
    func,
    insert,
    or_,
    select,
    update,
)
from sqlalchemy.exc import IntegrityError

from .campaigns import load_campaign
from .errors import CampaignError, NotFoundError
from .storage import connect_for_reading
from .storage.schema import campaign_variants, campaigns, messages
from .templates import load_template

__all__ = [
    "AB_METRICS",
    "Variant",
    "add_variant",
    "assign_variants",
    "choose_winner",
    "is_releasable",
    "load_variants",
    "save_ab_test",
]

#: What an A/B test can be judged on (the share of delivered recipients who ...).
AB_METRICS = ("click", "open", "unsubscribe", "complaint")
_MAX_SEED = 2**31 - 1  # campaigns.ab_seed is a 32-bit INTEGER on PostgreSQL


@dataclass(frozen=True)
class Variant:
    id: int
    campaign_id: int
    name: str
    template_id: int
    template_version: int
    subject: str | None


def add_variant(
    db: Engine, campaign_id: int, name: str, *, template: str | int, subject: str | None = None
) -> Variant:
    """Add a variant (a template, and a subject replacing the template's) to a draft campaign."""
    campaign = load_campaign(db, campaign_id)
    if campaign.status != "draft":
        raise CampaignError(
            f"campaign {campaign_id} is {campaign.status}: variants can only be added to a draft"
        )
    name = name.strip()
    if not name or len(name) > 40:
        raise CampaignError(f"variant name {name!r} must be 1 to 40 characters long")
    tpl = load_template(db, template)
    assert tpl.id is not None
    try:
        with db.begin() as conn:
            conn.execute(
                insert(campaign_variants).values(
                    campaign_id=campaign_id,
                    name=name,
                    template_id=tpl.id,
                    template_version=tpl.version,
                    subject=subject,
                )
            )
    except IntegrityError:
        raise CampaignError(
            f"campaign {campaign_id} already has a variant {name!r}: pick another name"
        ) from None
    return next(v for v in load_variants(db, campaign_id) if v.name == name)


def load_variants(db: Engine, campaign_id: int) -> list[Variant]:
    """The campaign's variants in the order they were added (empty: not an A/B test)."""
    cv = campaign_variants.c
    with connect_for_reading(db) as conn:
        rows = conn.execute(
            select(campaign_variants).where(cv.campaign_id == campaign_id).order_by(cv.id)
        ).all()
    return [
        Variant(r.id, r.campaign_id, r.name, r.template_id, r.template_version, r.subject)
        for r in rows
    ]


def _check_fraction(fraction: float | None) -> None:
    if fraction is not None and not 0 < fraction <= 1:
        raise CampaignError(f"the test fraction must be in (0, 1], not {fraction}")


def save_ab_test(
    db: Engine,
    campaign_id: int,
    *,
    fraction: float | None = None,
    metric: str = "click",
    seed: int | None = None,
) -> None:
    """Record a draft's A/B settings, used when its recipients are assigned at snapshot time.

    ``fraction``: share of recipients in the test (None: everyone gets a variant at once);
    ``metric``: what ``compare_variants`` judges by default (clicks: opens are unreliable);
    ``seed``: for a reproducible assignment (None: a random one, recorded when assigned).
    """
    campaign = load_campaign(db, campaign_id)
    if campaign.status != "draft":
        raise CampaignError(f"campaign {campaign_id} is {campaign.status}, no longer a draft")
    _check_fraction(fraction)
    if metric not in AB_METRICS:
        raise CampaignError(f"unknown A/B metric {metric!r}: use one of {', '.join(AB_METRICS)}")
    if seed is not None and not 0 <= seed <= _MAX_SEED:
        raise CampaignError(f"the seed must be between 0 and {_MAX_SEED}")
    with db.begin() as conn:
        conn.execute(
            update(campaigns)
            .where(campaigns.c.id == campaign_id)
            .values(ab_fraction=fraction, ab_metric=metric, ab_seed=seed)
        )


def assign_variants(
    db: Engine, campaign_id: int, *, seed: int | None = None, fraction: float | None = None
) -> dict[str | None, int]:
    """Give the snapshotted recipients their variants at random; return recipients per variant.

    ``seed`` and ``fraction`` default to those saved by ``save_ab_test`` (else a fresh random
    seed, and everyone). Both are recorded on the campaign. Only an untouched ledger (every row
    queued, none assigned) can be assigned; held-back rows get the key ``None`` in the result.
    ``send_campaign`` does this itself, in the snapshot's transaction.
    """
    with db.begin() as conn:
        return save_assignment(conn, campaign_id, seed=seed, fraction=fraction)


def save_assignment(
    conn: Connection, campaign_id: int, *, seed: int | None = None, fraction: float | None = None
) -> dict[str | None, int]:
    """``assign_variants`` inside the caller's transaction (``snapshot_campaign`` runs it in
    the snapshot's own, so that a ledger never exists without its variants)."""
    cv, c, m = campaign_variants.c, campaigns.c, messages.c
    names = list(
        conn.execute(select(cv.name).where(cv.campaign_id == campaign_id).order_by(cv.id)).scalars()
    )
    if len(names) < 2:
        raise CampaignError(
            f"campaign {campaign_id} has {len(names)} variant(s): add at least two "
            "with add_variant before assigning"
        )
    stored = conn.execute(
        select(c.status, c.ab_seed, c.ab_fraction).where(c.id == campaign_id)
    ).one()
    if stored.status == "draft":
        raise CampaignError(
            f"campaign {campaign_id} has no ledger yet: variants are assigned right after the "
            "snapshot (send_campaign does it; or call snapshot_campaign first)"
        )
    seed = seed if seed is not None else stored.ab_seed
    seed = seed if seed is not None else secrets.randbelow(_MAX_SEED)
    fraction = fraction if fraction is not None else stored.ab_fraction
    _check_fraction(fraction)
    touched = conn.execute(
        select(func.count()).where(
            m.campaign_id == campaign_id, or_(m.state != "queued", m.variant.is_not(None))
        )
    ).scalar_one()
    if touched:
        raise CampaignError(
            f"campaign {campaign_id} has {touched} recipients already assigned or sent: "
            "variants are assigned once, before sending"
        )
    ids = list(
        conn.execute(
            select(m.id).where(m.campaign_id == campaign_id).order_by(m.contact_id)
        ).scalars()
    )
    random.Random(seed).shuffle(ids)
    tested = len(ids) if fraction is None else round(len(ids) * fraction)
    if tested < len(names):
        raise CampaignError(
            f"a test of {tested} of {len(ids)} recipients cannot cover {len(names)} "
            "variants: raise the fraction"
        )
    rows = [{"row_id": ids[i], "v": names[i % len(names)]} for i in range(tested)]
    if rows:
        conn.execute(
            update(messages).where(m.id == bindparam("row_id")).values(variant=bindparam("v")),
            rows,
        )
    conn.execute(
        update(campaigns).where(c.id == campaign_id).values(ab_seed=seed, ab_fraction=fraction)
    )
    counts: dict[str | None, int] = {n: sum(1 for r in rows if r["v"] == n) for n in names}
    if tested < len(ids):
        counts[None] = len(ids) - tested
    return counts


def choose_winner(db: Engine, campaign_id: int, variant: str) -> int:
    """Record the winning variant and give it to every held-back recipient; return how many.

    Once chosen the winner cannot change (the held-back recipients may already have it).
    """
    if variant not in {v.name for v in load_variants(db, campaign_id)}:
        raise NotFoundError("variant", variant)
    with db.begin() as conn:
        current = conn.execute(
            select(campaigns.c.ab_winner).where(campaigns.c.id == campaign_id)
        ).scalar_one()
        if current is not None and current != variant:
            raise CampaignError(
                f"campaign {campaign_id} already rolled out variant {current!r} as the winner"
            )
        conn.execute(
            update(campaigns).where(campaigns.c.id == campaign_id).values(ab_winner=variant)
        )
        return int(
            conn.execute(
                update(messages)
                .where(
                    messages.c.campaign_id == campaign_id,
                    messages.c.variant.is_(None),
                    messages.c.state == "queued",
                )
                .values(variant=variant)
            ).rowcount
        )


def is_releasable() -> ColumnElement[bool]:
    """SQL over ``messages``: False for rows held back by an A/B test still waiting for a winner.

    A row is held back when its variant is NULL and its campaign has a test fraction
    (``ab_fraction``) but no winner (``ab_winner``). Claims must AND this into their condition.
    """
    c = campaigns.c
    waiting = exists().where(
        c.id == messages.c.campaign_id, c.ab_fraction.is_not(None), c.ab_winner.is_(None)
    )
    return or_(messages.c.variant.is_not(None), ~waiting)
