"""One pass for many breakdowns: the campaign's counts per (domain, variant, attributes...) cell.

Every recipient falls in exactly one cell, and every count of ``metrics`` is a number of
recipients, so the campaign's totals and each breakdown are sums over cells. The dashboard
reads the events once for all of them instead of once per breakdown; the results are the same
frames ``load_metrics`` and ``load_metrics_by_*`` return (the tests check they agree).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pandas as pd
from sqlalchemy import ColumnElement, Engine, FromClause, and_, func

from ..storage.schema import contact_attributes, messages
from .breakdowns import NONE, UNASSIGNED, _collapse_tail, _sorted_frame, build_domain_group
from .metrics import COUNT_COLUMNS, add_rates, select_metric_counts

__all__ = ["load_metric_cube", "summarise_cube"]

_DERIVED = ("sent", "all_openers")


def load_metric_cube(db: Engine, campaign_id: int, attributes: Sequence[str] = ()) -> pd.DataFrame:
    """Counts per cell of (``domain`` carrier-grouped, ``variant``, each attribute), one query.

    Columns: the dimensions, then ``COUNT_COLUMNS``. Missing values are ``(none)``, recipients
    without a variant ``(unassigned)``.
    """
    clash = {"domain", "variant"} & set(attributes)
    if clash:
        raise ValueError(f"attribute {sorted(clash)[0]!r} clashes with a built-in dimension")
    joined: FromClause = messages
    dimensions: list[ColumnElement[Any]] = [
        build_domain_group(messages.c.domain).label("domain"),
        func.coalesce(messages.c.variant, UNASSIGNED).label("variant"),
    ]
    for i, key in enumerate(attributes):
        alias = contact_attributes.alias(f"attr{i}")
        joined = joined.outerjoin(
            alias, and_(alias.c.contact_id == messages.c.contact_id, alias.c.key == key)
        )
        dimensions.append(func.coalesce(alias.c.value, NONE).label(f"attr{i}"))
    query = (
        select_metric_counts([campaign_id], joined=joined)
        .add_columns(*dimensions)
        .group_by(*dimensions)
    )
    names = ["domain", "variant", *attributes]
    with db.connect() as conn:
        result = conn.execute(query)
        frame = pd.DataFrame(result.all(), columns=list(result.keys()))
    frame = frame.rename(columns={f"attr{i}": key for i, key in enumerate(attributes)})
    counted = [c for c in COUNT_COLUMNS if c not in _DERIVED]
    frame[counted] = frame[counted].fillna(0).astype("int64")
    frame = frame[frame["recipients"] > 0]
    frame["sent"] = frame["accepted"] + frame["rejected"] + frame["expired"]
    frame["all_openers"] = frame["openers"] + frame["machine_openers"]
    return frame[[*names, *COUNT_COLUMNS]].reset_index(drop=True)


def summarise_cube(
    cube: pd.DataFrame, by: str | None = None, *, top: int | None = None
) -> pd.DataFrame:
    """Counts and rates of the whole cube (one row) or per value of dimension ``by``.

    Per dimension the groups are ordered and, with ``top``, the tail summed into ``(other)``
    as in the ``load_metrics_by_*`` functions.
    """
    if by is None:
        totals = cube[list(COUNT_COLUMNS)].sum().to_frame().T.astype("int64")
        return add_rates(totals)
    grouped = cube.groupby(by, sort=False)[list(COUNT_COLUMNS)].sum().astype("int64")
    return _collapse_tail(_sorted_frame(add_rates(grouped), by), top, by)
