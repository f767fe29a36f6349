"""Bulk look-ups and writes of a contact import, on the driver connection of its transaction.

SQLAlchemy's per-row parameter processing (and, on PostgreSQL, psycopg parsing giant multi-row
INSERTs) cost more than everything else in a million-row import, so the bulk statements go to
the DBAPI connection underneath the import's SQLAlchemy transaction: one JSON array per
statement through ``json_each`` on SQLite, ``COPY`` and ``= ANY(array)`` on PostgreSQL (for a
fresh load, binary arrays that INSERTs unnest, one per column, built in the reader thread).
They are still inside that one transaction, so a failure anywhere rolls back every chunk.

A fresh load (no contacts in the store yet) drops the secondary indexes of the contact tables,
and on PostgreSQL their foreign keys and the unique and primary keys no foreign key refers to,
and rebuilds them from their own catalog definitions at the end, in the same transaction:
building an index once by sorting, and checking a foreign key with one join, is several times
cheaper than maintaining them row by row. Meanwhile those
tables are locked for other writers (SQLite: always; PostgreSQL: also for readers), which
costs nothing while the store is empty.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from functools import lru_cache
from typing import Any

from sqlalchemy import Connection

from ..errors import ConfigError
from ..storage.schema import contact_attributes, contacts, list_members
from ._store import Accepted, AttrRow, ContactWriter, number_of

__all__ = ["open_writer"]

# Driver-level SQL names its tables literally; this fails at import if the schema renames them.
_TABLES = ("contacts", "contact_attributes", "list_members")
assert (contacts.name, contact_attributes.name, list_members.name) == _TABLES


def open_writer(conn: Connection, now: datetime) -> ContactWriter:
    """The writer for ``conn``'s backend; ``now`` stamps created_at/updated_at/added_at."""
    # The timestamp as the column type binds it (naive UTC text on SQLite).
    ts_type = contacts.c.updated_at.type.dialect_impl(conn.dialect)
    process = ts_type.bind_processor(conn.dialect)
    stamp = process(now) if process is not None else now
    driver = conn.connection.driver_connection
    if conn.dialect.name == "sqlite":
        return _SqliteWriter(driver, stamp)
    if conn.dialect.name == "postgresql" and conn.dialect.driver == "psycopg":
        return _PostgresWriter(driver, stamp)
    raise ConfigError(
        "contact import supports SQLite and PostgreSQL (psycopg 3), not "
        f"{conn.dialect.name}+{conn.dialect.driver}: use a sqlite:/// or "
        "postgresql+psycopg:// URL"
    )


def _json(rows: Sequence[Any]) -> str:
    return json.dumps(rows, ensure_ascii=False, check_circular=False)


# Integers SQLite's CAST turns into exactly the float number_of gives (below 2**53).
_SMALL_INTEGER = re.compile(r"[+-]?[0-9]{1,15}")
# How each attribute column of a prepared chunk carries value_num: none of its values is a
# number, all are small integers (SQLite casts them), or [value, number] pairs.
_SELECT_COLUMN = {
    "none": "SELECT ? + key, ?, value, NULL FROM json_each(?) WHERE value <> ''",
    "cast": "SELECT ? + key, ?, value, CAST(value AS REAL) FROM json_each(?) WHERE value <> ''",
    "pairs": "SELECT ? + key, ?, json_extract(value, '$[0]'), json_extract(value, '$[1]') "
    "FROM json_each(?) WHERE value <> ''",
}
_COLUMNS_PER_INSERT = 100  # SQLite allows 500 terms in a compound SELECT


@lru_cache(maxsize=64)
def _insert_columns_sql(modes: tuple[str, ...]) -> str:
    """One INSERT of several attribute columns (one SELECT each, by UNION ALL)."""
    selects = " UNION ALL ".join(_SELECT_COLUMN[mode] for mode in modes)
    return "INSERT INTO contact_attributes (contact_id, key, value, value_num) " + selects


@dataclass(frozen=True)
class _FreshChunk:
    """A chunk of a fresh load as JSON arrays, one element per contact in file order: the
    contacts ``[email, domain, name]``, and per attribute key its values ("": none), with
    how value_num comes with them (see _SELECT_COLUMN)."""

    size: int
    contacts: str
    columns: tuple[tuple[str, str, str], ...]  # key, value_num mode, JSON array


def _attribute_columns(
    accepted: list[Accepted], keys: Sequence[str]
) -> Iterator[tuple[str, tuple[str, ...], set[str]]]:
    """Each attribute column of the chunk that has a value: its key, its values ("": none)
    and their distinct non-empty values, which the callers test once each since values repeat
    a lot (prefectures, ages, ranks)."""
    for key, values in zip(keys, zip(*(item[4] for item in accepted), strict=True), strict=True):
        distinct = set(values)
        distinct.discard("")
        if distinct:
            yield key, values, distinct


def _prepare_fresh(accepted: list[Accepted], keys: Sequence[str]) -> _FreshChunk:
    """The chunk's writes by attribute column: SQLite reads plain JSON strings without a
    json_extract per value, and this Python work runs in the reader thread."""
    columns = []
    for key, values, distinct in _attribute_columns(accepted, keys):
        if all(number_of(v) is None for v in distinct):
            columns.append((key, "none", _json(values)))
        elif all(_SMALL_INTEGER.fullmatch(v) for v in distinct):
            columns.append((key, "cast", _json(values)))
        else:
            pairs = [(v, number_of(v)) if v else "" for v in values]
            columns.append((key, "pairs", _json(pairs)))
    contacts = _json([item[1:4] for item in accepted])
    return _FreshChunk(len(accepted), contacts, tuple(columns))


@dataclass(frozen=True)
class _PgFreshChunk:
    """A chunk of a fresh PostgreSQL load by column, as the arrays its INSERTs unnest: the
    contacts' addresses, names and domains, and per attribute key its values ("": none) and
    their numbers (None when no value of the key in the chunk is a number)."""

    size: int
    emails: list[str]
    names: list[str | None]
    domains: list[str]
    columns: tuple[tuple[str, list[str], list[float | None] | None], ...]


def _prepare_pg_fresh(accepted: list[Accepted], keys: Sequence[str]) -> _PgFreshChunk:
    columns = []
    for key, values, distinct in _attribute_columns(accepted, keys):
        numbers = {v: number_of(v) for v in distinct}
        has_numbers = any(n is not None for n in numbers.values())
        nums = [numbers.get(v) for v in values] if has_numbers else None
        columns.append((key, list(values), nums))
    return _PgFreshChunk(
        len(accepted),
        [item[1] for item in accepted],
        [item[3] for item in accepted],
        [item[2] for item in accepted],
        tuple(columns),
    )


class _SqliteWriter:
    """Rows travel as one JSON array per statement (``json_each``): SQLite parses and inserts
    them in C with the GIL released, while the import's reader thread parses the next chunk
    (and, for a fresh load, also builds those arrays: ``prepare``)."""

    def __init__(self, driver: Any, stamp: Any) -> None:
        self.cur = driver.cursor()
        self.stamp = stamp
        try:
            self.cur.execute("SELECT json_extract('[1]', '$[0]')")
        except Exception as exc:
            raise ConfigError(
                "this Python's SQLite library lacks the JSON functions that contact import "
                "uses: use a Python build with SQLite >= 3.38 (python.org, conda, Debian)"
            ) from exc
        self.fresh = self.cur.execute("SELECT NOT EXISTS (SELECT 1 FROM contacts)").fetchone()[0]
        self.rebuild: list[str] = []
        if self.fresh:
            # Explicit CREATE INDEX statements only: UNIQUE and PRIMARY KEY ones stay.
            found = self.cur.execute(
                "SELECT name, sql FROM sqlite_master WHERE type = 'index' AND sql IS NOT NULL "
                "AND tbl_name IN ('contacts', 'contact_attributes', 'list_members')"
            ).fetchall()
            for name, sql in found:
                if not sql.lstrip().upper().startswith("CREATE UNIQUE"):
                    quoted = name.replace('"', '""')
                    self.cur.execute(f'DROP INDEX "{quoted}"')
                    self.rebuild.append(sql)
        # The import's transaction holds SQLite's write lock (BEGIN IMMEDIATE, or since its
        # first write), so nobody else can take ids until it ends.
        (top,) = self.cur.execute("SELECT coalesce(max(id), 0) FROM contacts").fetchone()
        self.next_id: int = top + 1

    def finish(self) -> None:
        for sql in self.rebuild:
            self.cur.execute(sql)

    def prepare(self, accepted: list[Accepted], keys: Sequence[str]) -> object | None:
        return _prepare_fresh(accepted, keys) if self.fresh and accepted else None

    def add_prepared(self, prepared: object, list_id: int | None) -> None:
        assert isinstance(prepared, _FreshChunk)
        first, self.next_id = self.next_id, self.next_id + prepared.size
        self.cur.execute(
            "INSERT INTO contacts (id, email, name, domain, created_at, updated_at) "
            "SELECT ? + key, json_extract(value, '$[0]'), json_extract(value, '$[2]'), "
            "json_extract(value, '$[1]'), ?, ? FROM json_each(?)",
            (first, self.stamp, self.stamp, prepared.contacts),
        )
        # One statement for all the columns, not one each: after every statement this
        # thread waits for the GIL, which the reader thread holds most of the time.
        for lo in range(0, len(prepared.columns), _COLUMNS_PER_INSERT):
            group = prepared.columns[lo : lo + _COLUMNS_PER_INSERT]
            modes = tuple(mode for _, mode, _ in group)
            params = [param for key, _, values in group for param in (first, key, values)]
            self.cur.execute(_insert_columns_sql(modes), params)
        if list_id is not None:
            self.cur.execute(
                "INSERT INTO list_members (list_id, contact_id, added_at) "
                "SELECT ?, ? + key, ? FROM json_each(?)",
                (list_id, first, self.stamp, "[" + ",".join("0" * prepared.size) + "]"),
            )

    def find_contacts(self, emails: Sequence[str]) -> Iterable[tuple[int, str, str | None]]:
        sql = "SELECT id, email, name FROM contacts WHERE email IN (SELECT value FROM json_each(?))"
        rows: list[tuple[int, str, str | None]] = self.cur.execute(sql, (_json(emails),)).fetchall()
        return rows

    def find_attributes(self, ids: Sequence[int]) -> Iterable[tuple[int, str, str]]:
        sql = (
            "SELECT contact_id, key, value FROM contact_attributes "
            "WHERE contact_id IN (SELECT value FROM json_each(?))"
        )
        rows: list[tuple[int, str, str]] = self.cur.execute(sql, (_json(ids),)).fetchall()
        return rows

    def find_members(self, list_id: int, ids: Sequence[int]) -> Iterable[int]:
        sql = (
            "SELECT contact_id FROM list_members "
            "WHERE list_id = ? AND contact_id IN (SELECT value FROM json_each(?))"
        )
        return [cid for (cid,) in self.cur.execute(sql, (list_id, _json(ids)))]

    def add_contacts(self, rows: Sequence[tuple[str, str | None, str]]) -> list[int]:
        first, self.next_id = self.next_id, self.next_id + len(rows)
        self.cur.execute(
            "INSERT INTO contacts (id, email, name, domain, created_at, updated_at) "
            "SELECT ? + key, json_extract(value, '$[0]'), json_extract(value, '$[1]'), "
            "json_extract(value, '$[2]'), ?, ? FROM json_each(?)",
            (first, self.stamp, self.stamp, _json(rows)),
        )
        return list(range(first, first + len(rows)))

    def add_attributes(self, rows: Sequence[AttrRow]) -> None:
        self.cur.execute(
            "INSERT INTO contact_attributes (contact_id, key, value, value_num) "
            "SELECT json_extract(value, '$[0]'), json_extract(value, '$[1]'), "
            "json_extract(value, '$[2]'), json_extract(value, '$[3]') FROM json_each(?)",
            (_json(rows),),
        )

    def add_members(self, list_id: int, ids: Sequence[int]) -> None:
        self.cur.execute(
            "INSERT INTO list_members (list_id, contact_id, added_at) "
            "SELECT ?, value, ? FROM json_each(?)",
            (list_id, self.stamp, _json(ids)),
        )

    def touch_contacts(self, rows: Sequence[tuple[int, str | None]]) -> None:
        self.cur.executemany(
            "UPDATE contacts SET name = ?, updated_at = ? WHERE id = ?",
            [(name, self.stamp, cid) for cid, name in rows],
        )

    def change_attributes(self, rows: Sequence[AttrRow]) -> None:
        self.cur.executemany(
            "UPDATE contact_attributes SET value = ?, value_num = ? "
            "WHERE contact_id = ? AND key = ?",
            [(value, num, cid, key) for cid, key, value, num in rows],
        )


class _PostgresWriter:
    def __init__(self, driver: Any, stamp: Any) -> None:
        from psycopg.sql import SQL  # psycopg is the optional "postgres" extra

        self.cur = driver.cursor()
        self.stamp = stamp
        self.staging = False
        self.fresh = self.cur.execute("SELECT NOT EXISTS (SELECT 1 FROM contacts)").fetchone()[0]
        self.rebuild: list[Any] = []
        if not self.fresh:
            return
        # Keeps every other writer out of contacts until commit (readers too, below, once
        # the foreign keys are dropped). Concurrent first imports into one empty store may
        # deadlock here: PostgreSQL then aborts one of them (nothing is written) and the
        # other goes on.
        self.cur.execute("LOCK TABLE contacts IN SHARE ROW EXCLUSIVE MODE")
        tables = (list(_TABLES),)
        indexes = self.cur.execute(
            "SELECT quote_ident(n.nspname) || '.' || quote_ident(c.relname), "
            "pg_get_indexdef(i.indexrelid) "
            "FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid "
            "JOIN pg_namespace n ON n.oid = c.relnamespace "
            "WHERE i.indrelid = ANY(%s::regclass[]) AND NOT i.indisunique AND NOT i.indisprimary",
            tables,
        ).fetchall()
        keys = self.cur.execute(
            "SELECT conrelid::regclass::text, quote_ident(conname), pg_get_constraintdef(oid) "
            "FROM pg_constraint WHERE contype = 'f' AND conrelid = ANY(%s::regclass[])",
            tables,
        ).fetchall()
        # Unique and primary keys too, unless a foreign key refers to them (contacts.id):
        # checking each row's key against a growing index cost more of the load than
        # building the index once at the end (which checks the same uniqueness).
        uniques = self.cur.execute(
            "SELECT c.conrelid::regclass::text, quote_ident(c.conname), "
            "pg_get_constraintdef(c.oid) FROM pg_constraint c "
            "WHERE c.contype IN ('p', 'u') AND c.conrelid = ANY(%s::regclass[]) "
            "AND NOT EXISTS (SELECT 1 FROM pg_constraint f "
            "WHERE f.contype = 'f' AND f.conindid = c.conindid)",
            tables,
        ).fetchall()
        for table, name, definition in keys:
            self.cur.execute(SQL(f"ALTER TABLE {table} DROP CONSTRAINT {name}"))
            self.rebuild.append(SQL(f"ALTER TABLE {table} ADD CONSTRAINT {name} {definition}"))
        # The keys come back before the foreign keys, whose checks use contacts' primary key.
        for table, name, definition in uniques:
            self.cur.execute(SQL(f"ALTER TABLE {table} DROP CONSTRAINT {name}"))
            self.rebuild.insert(0, SQL(f"ALTER TABLE {table} ADD CONSTRAINT {name} {definition}"))
        for name, definition in indexes:
            self.cur.execute(SQL(f"DROP INDEX {name}"))
            self.rebuild.insert(0, SQL(definition))

    def prepare(self, accepted: list[Accepted], keys: Sequence[str]) -> object | None:
        return _prepare_pg_fresh(accepted, keys) if self.fresh and accepted else None

    def add_prepared(self, prepared: object, list_id: int | None) -> None:
        """A fresh chunk's rows from arrays (``%b``: dumped in binary, in C): the server
        unnests them, so no Python code runs per row or per attribute value here, in the
        thread that competes for the GIL with the reader."""
        assert isinstance(prepared, _PgFreshChunk)
        first = self._reserve_ids(prepared.size)[0]
        self.cur.execute(
            "INSERT INTO contacts (id, email, name, domain, created_at, updated_at) "
            "SELECT %s + n - 1, e, m, d, %s, %s "
            "FROM unnest(%b::text[], %b::text[], %b::text[]) WITH ORDINALITY AS t(e, m, d, n)",
            (first, self.stamp, self.stamp, prepared.emails, prepared.names, prepared.domains),
        )
        for key, values, nums in prepared.columns:
            self.cur.execute(
                "INSERT INTO contact_attributes (contact_id, key, value, value_num) "
                "SELECT %s + n - 1, %s, v, x "
                "FROM unnest(%b::text[], %b::float8[]) WITH ORDINALITY AS t(v, x, n) "
                "WHERE v <> ''",
                (first, key, values, nums),
            )
        if list_id is not None:
            self.cur.execute(
                "INSERT INTO list_members (list_id, contact_id, added_at) "
                "SELECT %s, %s + n, %s FROM generate_series(0, %s - 1) AS n",
                (list_id, first, self.stamp, prepared.size),
            )

    def finish(self) -> None:
        for statement in self.rebuild:
            self.cur.execute(statement)
        if self.fresh:
            # Fresh statistics, or the first segment counts plan for empty tables.
            self.cur.execute("ANALYZE contacts, contact_attributes, list_members")

    def find_contacts(self, emails: Sequence[str]) -> Iterable[tuple[int, str, str | None]]:
        sql = "SELECT id, email, name FROM contacts WHERE email = ANY(%s)"
        rows: list[tuple[int, str, str | None]] = self.cur.execute(sql, (list(emails),)).fetchall()
        return rows

    def find_attributes(self, ids: Sequence[int]) -> Iterable[tuple[int, str, str]]:
        sql = "SELECT contact_id, key, value FROM contact_attributes WHERE contact_id = ANY(%s)"
        rows: list[tuple[int, str, str]] = self.cur.execute(sql, (list(ids),)).fetchall()
        return rows

    def find_members(self, list_id: int, ids: Sequence[int]) -> Iterable[int]:
        sql = "SELECT contact_id FROM list_members WHERE list_id = %s AND contact_id = ANY(%s)"
        return [cid for (cid,) in self.cur.execute(sql, (list_id, list(ids)))]

    def _copy(self, table: str, columns: str, rows: Iterable[Sequence[Any]]) -> None:
        """COPY ``rows`` into ``table``; ``columns`` is "name type, ..." (binary format: the
        server parses no text, which matters most for timestamps)."""
        from psycopg.sql import SQL, Identifier

        pairs = [column.split() for column in columns.split(",")]
        names = SQL(", ").join(Identifier(name) for name, _ in pairs)
        statement = SQL("COPY {} ({}) FROM STDIN (FORMAT BINARY)").format(Identifier(table), names)
        with self.cur.copy(statement) as copy:
            copy.set_types([kind for _, kind in pairs])
            for row in rows:
                copy.write_row(row)

    def _reserve_ids(self, count: int) -> Sequence[int]:
        """``count`` new contact ids from the column's own sequence, so concurrent writers
        never collide on them."""
        if self.fresh:
            # One block per chunk (a million nextval calls cost seconds): safe because the
            # fresh load holds the lock that keeps every other writer out of contacts.
            (last,) = self.cur.execute(
                "SELECT setval(pg_get_serial_sequence('contacts', 'id'), "
                "nextval(pg_get_serial_sequence('contacts', 'id')) + %s - 1)",
                (count,),
            ).fetchone()
            return range(last - count + 1, last + 1)
        return [
            cid
            for (cid,) in self.cur.execute(
                "SELECT nextval(pg_get_serial_sequence('contacts', 'id')) "
                "FROM generate_series(1, %s)",
                (count,),
            )
        ]

    def add_contacts(self, rows: Sequence[tuple[str, str | None, str]]) -> list[int]:
        ids = self._reserve_ids(len(rows))
        ts = self.stamp
        self._copy(
            "contacts",
            "id int4, email text, name text, domain text, created_at timestamptz, "
            "updated_at timestamptz",
            ((cid, e, n, d, ts, ts) for cid, (e, n, d) in zip(ids, rows, strict=True)),
        )
        return list(ids)

    def add_attributes(self, rows: Sequence[AttrRow]) -> None:
        self._copy(
            "contact_attributes", "contact_id int4, key text, value text, value_num float8", rows
        )

    def add_members(self, list_id: int, ids: Sequence[int]) -> None:
        ts = self.stamp
        self._copy(
            "list_members",
            "list_id int4, contact_id int4, added_at timestamptz",
            ((list_id, cid, ts) for cid in ids),
        )

    def _stage(self) -> None:
        if not self.staging:
            # Dropped at commit or rollback: nothing outlives the import's transaction.
            self.cur.execute(
                "CREATE TEMP TABLE mk_import_touch (id integer, name text) ON COMMIT DROP"
            )
            self.cur.execute(
                "CREATE TEMP TABLE mk_import_attr (contact_id integer, key text, value text, "
                "value_num double precision) ON COMMIT DROP"
            )
            self.staging = True

    def touch_contacts(self, rows: Sequence[tuple[int, str | None]]) -> None:
        self._stage()
        self.cur.execute("TRUNCATE mk_import_touch")
        self._copy("mk_import_touch", "id int4, name text", rows)
        self.cur.execute(
            "UPDATE contacts AS c SET name = t.name, updated_at = %s "
            "FROM mk_import_touch AS t WHERE c.id = t.id",
            (self.stamp,),
        )

    def change_attributes(self, rows: Sequence[AttrRow]) -> None:
        self._stage()
        self.cur.execute("TRUNCATE mk_import_attr")
        self._copy(
            "mk_import_attr", "contact_id int4, key text, value text, value_num float8", rows
        )
        self.cur.execute(
            "UPDATE contact_attributes AS a SET value = t.value, value_num = t.value_num "
            "FROM mk_import_attr AS t WHERE a.contact_id = t.contact_id AND a.key = t.key"
        )
