"""Merging an import's chunks into the store: what is new, what changed, what to count.

The look-ups and writes themselves are a :class:`ContactWriter`'s (see ``_writers``).
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, Protocol

__all__ = ["Accepted", "AttrRow", "ContactWriter", "Tally", "number_of", "store_chunk"]

# row, email, domain, name, and the attribute values in the order of the import's keys ("": none)
Accepted = tuple[int, str, str, str | None, tuple[str, ...]]
AttrRow = tuple[int, str, str, float | None]  # contact_id, key, value, value_num

_PLAIN_NUMBER = re.compile(r"[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)")


@lru_cache(maxsize=4096)  # attribute values repeat a lot (prefectures, ages, ranks)
def number_of(value: str) -> float | None:
    """``value`` as a number when it reads as one (full-width digits too), else None."""
    if not value.isascii():
        value = unicodedata.normalize("NFKC", value)  # full-width digits typed in Japanese IMEs
    return float(value) if _PLAIN_NUMBER.fullmatch(value) else None


@dataclass
class Tally:
    """Running counts of an import (see ImportReport)."""

    rows: int = 0
    added: int = 0
    updated: int = 0
    unchanged: int = 0
    rejected: list[Any] = field(default_factory=list)
    first_row: dict[str, int] = field(default_factory=dict)  # address -> row that brought it


class ContactWriter(Protocol):
    """Bulk look-ups and writes of one import, on the driver connection of its transaction.

    ``fresh`` is True when the store had no contacts when the import began: nothing can match
    then, so store_chunk skips the look-ups (in-file duplicates are caught before this).
    ``finish`` completes the import's writes (e.g. rebuilds indexes a fresh load dropped).

    ``prepare`` may build a fresh load's writes of a chunk ahead, in the import's reader thread
    (so without touching the database): ``add_prepared`` then writes them instead of
    store_chunk. It returns None when the writer has no such path (the chunk is merged by
    store_chunk).
    """

    fresh: bool

    def prepare(self, accepted: list[Accepted], keys: Sequence[str]) -> object | None: ...

    def add_prepared(self, prepared: object, list_id: int | None) -> None: ...

    def find_contacts(self, emails: Sequence[str]) -> Iterable[tuple[int, str, str | None]]: ...

    def find_attributes(self, ids: Sequence[int]) -> Iterable[tuple[int, str, str]]: ...

    def find_members(self, list_id: int, ids: Sequence[int]) -> Iterable[int]: ...

    def add_contacts(self, rows: Sequence[tuple[str, str | None, str]]) -> list[int]: ...

    def add_attributes(self, rows: Sequence[AttrRow]) -> None: ...

    def add_members(self, list_id: int, ids: Sequence[int]) -> None: ...

    def touch_contacts(self, rows: Sequence[tuple[int, str | None]]) -> None: ...

    def change_attributes(self, rows: Sequence[AttrRow]) -> None: ...

    def finish(self) -> None: ...


def store_chunk(
    writer: ContactWriter,
    accepted: list[Accepted],
    keys: Sequence[str],
    list_id: int | None,
    tally: Tally,
) -> None:
    """Merge one chunk of accepted rows into the store and count what happened to each.

    A known contact is ``updated`` only if its name, an attribute or its list membership
    actually changes (then updated_at moves), else ``unchanged``: re-importing the same file
    writes nothing.
    """
    if not accepted:
        return
    known: dict[str, tuple[int, str | None]] = {}
    if not writer.fresh:
        emails = [a[1] for a in accepted]
        known.update((email, (cid, name)) for cid, email, name in writer.find_contacts(emails))
    old_attrs: dict[int, dict[str, str]] = {}
    members: set[int] = set()
    if known:
        ids = [cid for cid, _ in known.values()]
        for cid, key, value in writer.find_attributes(ids):
            old_attrs.setdefault(cid, {})[key] = value
        if list_id is not None:
            members.update(writer.find_members(list_id, ids))

    new: list[Accepted] = []
    attr_new: list[AttrRow] = []
    attr_changed: list[AttrRow] = []
    touched: list[tuple[int, str | None]] = []
    joined: list[int] = []
    for item in accepted:
        hit = known.get(item[1])
        if hit is None:
            new.append(item)
            continue
        cid, old_name = hit
        name, attrs = item[3], item[4]
        changed = name is not None and name != old_name
        old = old_attrs.get(cid, {})
        for key, value in zip(keys, attrs, strict=True):
            if not value:
                continue
            before = old.get(key)
            if before is None:
                attr_new.append((cid, key, value, number_of(value)))
            elif before != value:
                attr_changed.append((cid, key, value, number_of(value)))
            else:
                continue
            changed = True
        if list_id is not None and cid not in members:
            joined.append(cid)
            changed = True
        if changed:
            touched.append((cid, name or old_name))
            tally.updated += 1
        else:
            tally.unchanged += 1

    if new:
        new_ids = writer.add_contacts([(e, n, d) for _, e, d, n, _ in new])
        for cid, (_, _, _, _, attrs) in zip(new_ids, new, strict=True):
            attr_new.extend(
                (cid, k, v, number_of(v)) for k, v in zip(keys, attrs, strict=True) if v
            )
        if list_id is not None:
            joined.extend(new_ids)
        tally.added += len(new)
    if touched:
        writer.touch_contacts(touched)
    if attr_changed:
        writer.change_attributes(attr_changed)
    if attr_new:
        writer.add_attributes(attr_new)
    if joined and list_id is not None:
        writer.add_members(list_id, joined)
