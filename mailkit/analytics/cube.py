"""One pass for many breakdowns: the campaign's counts per (domain, variant, attributes...) cell.

Every recipient falls in exactly one cell, and every count of ``metrics`` is a number of
recipients, so the campaign's totals and each breakdown are sums over cells. The dashboard
reads the events once for all of them instead of once per breakdown; the results are the same
frames ``load_metrics`` and ``load_metrics_by_*`` return (the tests check they agree).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import pandas as pd
from sqlalchemy import ColumnElement, Engine, FromClause, and_, func, select

from ..storage.schema import contact_attributes, messages
from .breakdowns import NONE, UNASSIGNED, _collapse_tail, _sorted_frame, build_domain_group
from .metrics import COUNT_COLUMNS, add_rates, select_metric_counts
from .reading import connect_analytics, open_reader_pool

__all__ = ["load_metric_cube", "summarise_cube"]

_DERIVED = ("sent", "all_openers")
# SQLite runs a query on one core: above this many recipients the cube is counted in ledger
# ranges side by side, one per core (up to four). PostgreSQL plans parallel workers itself.
_SPLIT_ABOVE = 200_000
_MAX_PARTS = 4


def _split_ledger(db: Engine, campaign_id: int) -> list[tuple[int, int] | None]:
    """Ledger-row id ranges to count separately (``[None]``: all in one query)."""
    cores = min(os.cpu_count() or 1, _MAX_PARTS)
    if db.dialect.name != "sqlite" or cores < 2:
        return [None]
    m = messages.c
    with connect_analytics(db) as conn:
        low, high, rows = conn.execute(
            select(func.min(m.id), func.max(m.id), func.count()).where(m.campaign_id == campaign_id)
        ).one()
    if rows <= _SPLIT_ABOVE:
        return [None]
    step = (high - low) // cores + 1
    return [(lo, min(lo + step - 1, high)) for lo in range(low, high + 1, step)]


def load_metric_cube(db: Engine, campaign_id: int, attributes: Sequence[str] = ()) -> pd.DataFrame:
    """Counts per cell of (``domain`` carrier-grouped, ``variant``, each attribute), one pass.

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
    parts = _split_ledger(db, campaign_id)

    def count_part(ids: tuple[int, int] | None) -> pd.DataFrame:
        part = query if ids is None else query.where(messages.c.id.between(*ids))
        with connect_analytics(db) as conn:
            if conn.dialect.name == "postgresql":
                # The planner cannot see how few cells there are (a few hundred: it
                # multiplies the distinct values stored for every attribute, and takes 200
                # for a column that is all NULL), so it sorts a million joined rows in each
                # parallel worker to group them. Hashing them into the cells instead, after
                # the joins ran in parallel, took ~30 % less server CPU at 1M recipients
                # for the same time (bench/scale.py). The query has no ORDER BY to keep.
                conn.exec_driver_sql("SET LOCAL enable_sort = off")
                conn.exec_driver_sql("SET LOCAL parallel_tuple_cost = 0.01")
            result = conn.execute(part)
            return pd.DataFrame(result.all(), columns=list(result.keys()))

    if len(parts) == 1:
        frame = count_part(parts[0])
    else:
        # Every count is a number of recipients: cells of disjoint ledger ranges add up.
        with open_reader_pool(db, len(parts)) as pool:
            pieces = list(pool.map(count_part, parts))
        keys = [f"attr{i}" for i in range(len(attributes))]
        frame = pd.concat(pieces).groupby(["domain", "variant", *keys], as_index=False).sum()
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
