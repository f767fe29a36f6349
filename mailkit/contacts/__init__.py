"""Contacts: import from CSV or a DataFrame, address validation, dedupe, lists, suppressions.

An import is one database transaction, streamed in chunks: each chunk's rows are validated,
deduplicated against the file so far, matched against the store by address and written in
bulk on the driver connection (JSON arrays through ``json_each`` on SQLite, COPY on
PostgreSQL; see ``_store`` and ``_writers``), so memory is bounded by the chunk size (plus one
dict entry per distinct address, for in-file duplicate detection). A reader thread parses and
validates the next chunks meanwhile, and for a first load into an empty store also builds
their inserts. A file that cannot be read raises and changes nothing; rows that cannot
be imported come back in the :class:`ImportReport`.
"""

from __future__ import annotations

import gc
import os
import re
import sqlite3
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, closing, contextmanager
from dataclasses import asdict, dataclass
from functools import lru_cache
from operator import itemgetter
from pathlib import Path
from typing import TYPE_CHECKING, Any

import email_validator
import pandas as pd
from email_validator import EmailNotValidError, validate_email
from email_validator.rfc_constants import CASE_INSENSITIVE_MAILBOX_NAMES
from sqlalchemy import Connection, Engine, func, insert, select
from sqlalchemy.exc import IntegrityError

from ..errors import NotFoundError
from ..storage import connect_for_reading
from ..storage.schema import (
    contact_attributes,
    contacts,
    list_members,
    lists,
    suppressions,
    utcnow,
)
from ._reading import (
    RESERVED_FIELDS,
    Chunk,
    Columns,
    build_columns,
    csv_chunks,
    detect_encoding,
    frame_chunks,
    open_csv,
    open_file,
    read_ahead,
)
from ._store import Accepted, ContactWriter, Tally, store_chunk
from ._writers import open_writer

if TYPE_CHECKING:
    from tqdm import tqdm

__all__ = [
    "RESERVED_FIELDS",
    "ImportReport",
    "RejectedRow",
    "detect_encoding",
    "import_contacts",
    "load_contacts",
    "load_lists",
    "load_suppressions",
    "normalize_email",
    "save_suppression",
]

_NAME_MAX = int(contacts.c.name.type.length or 200)  # type: ignore[attr-defined]

# A strict ASCII subset of what email-validator accepts, normalised exactly as it would be:
# validate_email costs ~20 µs, too slow for a million rows. Anything outside the subset (and
# every rejection) goes through email-validator itself, so results and reasons are its own.
_ATEXT = r"A-Za-z0-9!#$%&'*+/=?^_`{|}~-"
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_SIMPLE_LOCAL = re.compile(rf"[{_ATEXT}]+(?:\.[{_ATEXT}]+)*")
_SIMPLE_DOMAIN = re.compile(rf"(?:{_LABEL}\.)+(?:[A-Za-z0-9][A-Za-z0-9-]{{0,61}})?[A-Za-z]")
_SPECIAL_DOMAINS = frozenset(email_validator.SPECIAL_USE_DOMAIN_NAMES)
_SPECIAL_SUFFIXES = tuple("." + d for d in email_validator.SPECIAL_USE_DOMAIN_NAMES)
_CASELESS_MAILBOXES = frozenset(CASE_INSENSITIVE_MAILBOX_NAMES)


@dataclass(frozen=True)
class RejectedRow:
    """A row that was not imported: spreadsheet row number (header = 1), raw value, reason."""

    row: int
    value: str
    reason: str


@dataclass(frozen=True, repr=False)
class ImportReport:
    """What an import did; ``rows == added + updated + unchanged + len(rejected)``."""

    source: str
    encoding: str | None
    rows: int
    added: int
    updated: int
    unchanged: int
    rejected: tuple[RejectedRow, ...]
    list_name: str | None

    def to_dict(self) -> dict[str, Any]:
        """The report as plain JSON-ready values."""
        return asdict(self)

    def __repr__(self) -> str:
        # A million rejected rows must not flood a notebook cell.
        head = ", ".join(f"row {r.row}: {r.value!r} ({r.reason})" for r in self.rejected[:5])
        more = f", … {len(self.rejected) - 5} more" if len(self.rejected) > 5 else ""
        return (
            f"ImportReport(source={self.source!r}, encoding={self.encoding!r}, rows={self.rows}, "
            f"added={self.added}, updated={self.updated}, unchanged={self.unchanged}, "
            f"rejected={len(self.rejected)} [{head}{more}], list_name={self.list_name!r})"
        )


# ---------------------------------------------------------------------------- addresses


def normalize_email(raw: str) -> str:
    """The normalised form of ``raw`` (stripped, domain lower-cased), or ValueError saying why."""
    return _normalize(raw)[0]


@lru_cache(maxsize=4096)  # a list has far fewer domains than addresses
def _simple_domain(domain: str) -> str | None:
    """``domain`` lower-cased when the fast path may take it, else None."""
    if _SIMPLE_DOMAIN.fullmatch(domain) is None:
        return None
    lowered = domain.lower()
    if "--" in lowered or lowered in _SPECIAL_DOMAINS or lowered.endswith(_SPECIAL_SUFFIXES):
        return None
    return lowered


def _normalize(raw: str) -> tuple[str, str]:
    addr = raw.strip()
    if not addr:
        raise ValueError("empty address")
    # The subset's local part has no "@": split at the last one (a quoted local part that
    # holds one fails _SIMPLE_LOCAL and goes to email-validator).
    local, _, domain = addr.rpartition("@")
    if (
        len(addr) <= 254
        and (lowered := _simple_domain(domain)) is not None
        and _SIMPLE_LOCAL.fullmatch(local) is not None
        and local.lower() not in _CASELESS_MAILBOXES
    ):
        return f"{local}@{lowered}", lowered
    try:
        valid = validate_email(addr, check_deliverability=False)
    except EmailNotValidError as exc:
        raise ValueError(str(exc)) from None
    return valid.normalized, valid.domain


# ---------------------------------------------------------------------------- import


def import_contacts(
    db: Engine,
    source: str | os.PathLike[str] | pd.DataFrame,
    *,
    list_name: str | None = None,
    encoding: str | None = None,
    progress: bool = False,
    chunk_size: int = 10_000,
) -> ImportReport:
    """Import contacts from a CSV file or a DataFrame, in one transaction.

    The email column is found by name (email, メールアドレス, ...), likewise an optional name
    column (name, 氏名, ...); every other column becomes an attribute. A CSV's encoding is
    detected (UTF-8, UTF-8 with BOM, CP932) unless ``encoding`` names it. Existing contacts
    are merged (non-empty values overwrite, absent ones are kept); with ``list_name`` every
    accepted contact becomes a member of that list. Rows that cannot be imported are listed
    in the report; a source that cannot be read raises ContactImportError and changes nothing.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be at least 1, not {chunk_size}")
    if list_name is not None and not list_name.strip():
        raise ValueError("list_name is empty: pass a list name or None")
    read = _ByteCount()
    with ExitStack() as stack:
        chunks: Iterator[Chunk]
        if isinstance(source, pd.DataFrame):
            where, used = "DataFrame", None
            bar = stack.enter_context(_progress_bar(progress, len(source), "rows"))
            chunks = frame_chunks(source, chunk_size)
            header = [str(c) for c in source.columns]
        else:
            path = Path(source)
            where = str(path)
            fh = stack.enter_context(open_file(path))
            bar = stack.enter_context(_progress_bar(progress, path.stat().st_size, "B"))
            used, header, reader = open_csv(fh, path, encoding, read)
            chunks = csv_chunks(reader, where, chunk_size)
        cols = build_columns(header, where)
        keys = [key for _, key in cols.attributes]
        tally = Tally()
        now = utcnow()
        with _no_cyclic_gc(), db.connect() as conn, _trusted_references(conn), conn.begin():
            list_id = None if list_name is None else _ensure_list(conn, list_name, now)
            writer = open_writer(conn, now)
            with closing(read_ahead(_read_chunks(chunks, cols, keys, tally, writer))) as ahead:
                for rows, prepared, size in ahead:
                    if prepared is not None:
                        writer.add_prepared(prepared, list_id)
                        tally.added += len(rows)
                    else:
                        store_chunk(writer, rows, keys, list_id, tally)
                    # The bar moves here, not in the reader thread (notebook widgets are not
                    # thread-safe): by rows for a DataFrame, by bytes read for a file.
                    bar.update(size if used is None else read.take())
            writer.finish()
    return ImportReport(
        source=where,
        encoding=used,
        rows=tally.rows,
        added=tally.added,
        updated=tally.updated,
        unchanged=tally.unchanged,
        rejected=tuple(tally.rejected),
        list_name=list_name,
    )


def _read_chunks(
    chunks: Iterator[Chunk],
    cols: Columns,
    keys: Sequence[str],
    tally: Tally,
    writer: ContactWriter,
) -> Iterator[tuple[list[Accepted], object | None, int]]:
    """Each chunk's accepted rows, what the writer prepared of them ahead, and its size.

    This runs in the reader thread: it owns tally.rows/rejected/first_row, the importing
    thread added/updated/unchanged. Building a fresh load's writes here (``prepare``) keeps
    that Python work off the thread that waits on the database.
    """
    for chunk in chunks:
        rows = _accept_rows(chunk, cols, tally)
        yield rows, writer.prepare(rows, keys), len(chunk)


class _ByteCount:
    """Bytes read so far by the reader thread, handed out to the progress bar in deltas."""

    def __init__(self) -> None:
        self.total = self.shown = 0

    def __call__(self, size: int) -> None:
        self.total += size

    def take(self) -> int:
        total = self.total
        delta, self.shown = total - self.shown, total
        return delta


@contextmanager
def _trusted_references(conn: Connection) -> Iterator[None]:
    """On SQLite, no foreign key checks during the import's transaction (the pragma only
    takes effect outside one): it references only contacts and a list that it wrote or read
    itself while holding the write lock, so no check could fail, and they cost about a sixth
    of a fresh load's inserts. Back on before the connection returns to the pool."""
    if conn.dialect.name != "sqlite":
        yield
        return
    driver = conn.connection.driver_connection
    assert driver is not None
    driver.execute("PRAGMA foreign_keys=OFF")
    try:
        yield
    finally:
        try:
            driver.execute("PRAGMA foreign_keys=ON")
        except sqlite3.Error:
            conn.invalidate()  # closed, never back in the pool without its checks


@contextmanager
def _no_cyclic_gc() -> Iterator[None]:
    # An import allocates millions of short-lived row tuples and lists that form no cycles;
    # the cyclic collector's passes over them cost almost half of a big file's parsing time.
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _progress_bar(enabled: bool, total: int, unit: str) -> tqdm[Any]:
    from tqdm.auto import tqdm  # deferred: it probes for Jupyter widgets at import

    return tqdm(total=total, unit=unit, unit_scale=True, desc="import", disable=not enabled)


def _accept_rows(chunk: Chunk, cols: Columns, tally: Tally) -> list[Accepted]:
    accepted: list[Accepted] = []
    width, email_at, name_at = cols.width, cols.email, cols.name
    pick = _attribute_picker(cols)
    reject = tally.rejected.append
    first_row = tally.first_row
    rows = 0
    for row, cells in chunk:
        raw = cells[email_at] if email_at < len(cells) else ""
        if not raw.strip() and not any(c.strip() for c in cells):
            continue  # a blank line is not a row (it still counts for the row numbers)
        rows += 1
        if len(cells) != width:
            if len(cells) > width and any(c.strip() for c in cells[width:]):
                reject(RejectedRow(row, raw, f"{len(cells)} cells, but the header has {width}"))
                continue
            cells = (cells + [""] * width)[:width]
        try:
            email, domain = _normalize(raw)
        except ValueError as exc:
            reject(RejectedRow(row, raw, str(exc)))
            continue
        first = first_row.get(email)
        if first is not None:
            reject(RejectedRow(row, raw, f"duplicate of row {first}"))
            continue
        name = cells[name_at].strip() if name_at is not None else ""
        if len(name) > _NAME_MAX:
            reject(RejectedRow(row, raw, f"name is longer than {_NAME_MAX} characters"))
            continue
        first_row[email] = row
        accepted.append((row, email, domain, name or None, tuple(map(str.strip, pick(cells)))))
    tally.rows += rows
    return accepted


def _attribute_picker(cols: Columns) -> Callable[[list[str]], Sequence[str]]:
    """The attribute cells of a row, in the order of ``cols.attributes`` (picked in C)."""
    at = [i for i, _ in cols.attributes]
    if len(at) > 1:
        return itemgetter(*at)
    return lambda cells: [cells[i] for i in at]  # itemgetter of one index is no sequence


def _ensure_list(conn: Connection, name: str, now: Any) -> int:
    found = conn.execute(select(lists.c.id).where(lists.c.name == name)).scalar_one_or_none()
    if found is not None:
        return int(found)
    created = conn.execute(insert(lists).values(name=name, created_at=now).returning(lists.c.id))
    return int(created.scalar_one())


# ---------------------------------------------------------------------------- loading, suppressions


def load_contacts(db: Engine, *, list_name: str | None = None) -> pd.DataFrame:
    """Contacts as a DataFrame: id, email, name, domain, then one column per attribute (text).

    With ``list_name`` only that list's members; NotFoundError if there is no such list.
    """
    c, ca = contacts.c, contact_attributes.c
    query = select(c.id, c.email, c.name, c.domain).order_by(c.id)
    attr_query = select(ca.contact_id, ca.key, ca.value)
    with connect_for_reading(db) as conn:
        if list_name is not None:
            members = select(list_members.c.contact_id).where(
                list_members.c.list_id == _list_id(conn, list_name)
            )
            query = query.where(c.id.in_(members))
            attr_query = attr_query.where(ca.contact_id.in_(members))
        frame = pd.DataFrame(conn.execute(query).all(), columns=["id", "email", "name", "domain"])
        attrs = pd.DataFrame(conn.execute(attr_query).all(), columns=["contact_id", "key", "value"])
    if attrs.empty:
        return frame
    wide = attrs.pivot(index="contact_id", columns="key", values="value")
    wide = wide[sorted(wide.columns)]
    wide.columns.name = None
    return frame.join(wide, on="id")


def _list_id(conn: Connection, name: str) -> int:
    found = conn.execute(select(lists.c.id).where(lists.c.name == name)).scalar_one_or_none()
    if found is None:
        raise NotFoundError("list", name)
    return int(found)


def load_lists(db: Engine) -> pd.DataFrame:
    """Every list with its member count: columns name, members."""
    lm = list_members.c
    query = (
        select(lists.c.name, func.count(lm.contact_id).label("members"))
        .select_from(lists.outerjoin(list_members, lm.list_id == lists.c.id))
        .group_by(lists.c.id, lists.c.name)
        .order_by(lists.c.name)
    )
    with connect_for_reading(db) as conn:
        return pd.DataFrame(conn.execute(query).all(), columns=["name", "members"])


def save_suppression(
    db: Engine,
    email: str,
    *,
    reason: str,
    detail: str | None = None,
    campaign_id: int | None = None,
) -> bool:
    """Suppress ``email`` for every future campaign; True if it was not suppressed before.

    The address is normalised like an imported one so that it matches the contact.
    """
    if not reason or len(reason) > 40:
        raise ValueError(f"reason must be 1-40 characters (e.g. 'bounce'), not {reason!r}")
    try:
        address = normalize_email(email)
    except ValueError:
        # A bounce or complaint may name an address no import would accept: keep it anyway.
        local, at, domain = email.strip().rpartition("@")
        address = f"{local}@{domain.lower()}" if at else email.strip()
        if not address:
            raise ValueError("cannot suppress an empty address") from None
    s = suppressions.c
    try:
        with db.begin() as conn:
            if conn.execute(select(s.email).where(s.email == address)).first() is not None:
                return False
            values = {"reason": reason, "detail": detail, "campaign_id": campaign_id}
            conn.execute(insert(suppressions).values(email=address, created_at=utcnow(), **values))
    except IntegrityError:
        return False  # a concurrent writer suppressed it first
    return True


def load_suppressions(db: Engine) -> pd.DataFrame:
    """Suppressed addresses: email, reason, detail, campaign_id, created_at (oldest first)."""
    s = suppressions.c
    query = select(s.email, s.reason, s.detail, s.campaign_id, s.created_at)
    with connect_for_reading(db) as conn:
        rows = conn.execute(query.order_by(s.created_at, s.email)).all()
    return pd.DataFrame(rows, columns=["email", "reason", "detail", "campaign_id", "created_at"])
