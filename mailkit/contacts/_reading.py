"""Reading a contact source: encoding detection, lazily decoded CSV lines, DataFrame rows,
and the mapping of header names to the email, name and attribute columns."""

from __future__ import annotations

import codecs
import csv
import math
import queue
import re
import threading
import unicodedata
from collections.abc import Callable, Generator, Iterable, Iterator, Sequence
from dataclasses import dataclass
from itertools import chain
from pathlib import Path
from typing import IO, Any, TypeVar

import pandas as pd

from ..errors import ContactImportError, EncodingDetectionError
from ..storage.schema import contact_attributes

__all__ = [
    "RESERVED_FIELDS",
    "Chunk",
    "Columns",
    "build_columns",
    "csv_chunks",
    "detect_encoding",
    "frame_chunks",
    "open_csv",
    "open_file",
    "read_ahead",
]

#: Names segments use for built-in fields; an attribute column may not take them.
RESERVED_FIELDS = frozenset({"id", "email", "name", "domain", "list"})

_EMAIL_HEADERS = frozenset(
    {"email", "mail", "emailaddress", "mailaddress", "メール", "メールアドレス", "eメール"}
    | {"eメールアドレス", "メアド", "電子メール", "電子メールアドレス", "pcメールアドレス"}
)
_NAME_HEADERS = frozenset(
    {"name", "fullname", "displayname", "contactname", "customername", "名前", "お名前"}
    | {"氏名", "姓名", "なまえ", "顧客名", "会員名", "お客様名"}
)
_HEADER_NOISE = re.compile(r"[\s\-_・\ufeff]+")
_BLOCK = 1 << 20
_KEY_MAX = int(contact_attributes.c.key.type.length or 100)  # type: ignore[attr-defined]
_Counter = Callable[[int], object]
_T = TypeVar("_T")


# ---------------------------------------------------------------------------- encodings


def detect_encoding(data: bytes) -> str:
    """The encoding of ``data``: 'utf-8-sig' if it starts with a BOM, 'utf-8' if it decodes
    strictly, else 'cp932' if that decodes; else EncodingDetectionError saying where each fails.
    """
    return _detect(lambda: iter((data,)), "the data")


def _detect(open_blocks: Callable[[], Iterator[bytes]], where: str) -> str:
    blocks = open_blocks()
    first = next(blocks, b"")
    if first.startswith(codecs.BOM_UTF8):
        return "utf-8-sig"
    failures = []
    for candidate in ("utf-8", "cp932"):
        # The whole input is scanned (streamed): a file can be ASCII for a million rows
        # and turn Japanese on the last one.
        stream = chain((first,), blocks) if candidate == "utf-8" else open_blocks()
        failure = _first_decode_error(stream, candidate)
        if failure is None:
            return candidate
        failures.append(failure)
    raise EncodingDetectionError(
        f"cannot tell the encoding of {where}: it is neither UTF-8 nor CP932/Shift_JIS "
        f"({'; '.join(failures)}). Save it from Excel as 'CSV UTF-8', or pass encoding=... "
        "naming its encoding."
    )


def _first_decode_error(blocks: Iterable[bytes], encoding: str) -> str | None:
    decoder = codecs.getincrementaldecoder(encoding)()
    offset = newlines = 0
    block = b""
    try:
        for block in blocks:
            decoder.decode(block)
            offset, newlines = offset + len(block), newlines + block.count(b"\n")
        block = b""
        decoder.decode(b"", True)
    except UnicodeDecodeError as exc:
        # exc.object is the decoder's pending bytes followed by this block.
        at = max(0, offset - (len(exc.object) - len(block)) + exc.start)
        line = newlines + block[: max(0, at - offset)].count(b"\n") + 1
        return f"{encoding} fails at line {line}, byte {at}: {exc.reason}"
    return None


def _file_blocks(path: Path) -> Iterator[bytes]:
    with path.open("rb") as fh:
        while block := fh.read(_BLOCK):
            yield block


def _canonical_encoding(name: str) -> str:
    try:
        canonical = codecs.lookup(name).name
    except LookupError:
        raise ContactImportError(
            f"unknown encoding {name!r}: use e.g. 'utf-8', 'utf-8-sig' or 'cp932'"
        ) from None
    if canonical.startswith(("utf-16", "utf-32")):
        raise ContactImportError(
            f"{name} files are not supported: save the file as 'CSV UTF-8' and import that"
        )
    # What Excel and Windows call Shift_JIS is CP932, a superset (①, ㈱, NEC/IBM kanji).
    return "cp932" if canonical == "shift_jis" else canonical


def _iter_lines(fh: IO[bytes], encoding: str, where: str, on_bytes: _Counter) -> Iterator[str]:
    """Decoded lines, each decoded when the CSV reader reaches it, so a bad byte is reported
    with its line and surfaces in the chunk that holds it."""
    codec = "utf-8" if encoding == "utf-8-sig" else encoding
    carry, line_no, offset, sep = b"", 0, 0, b""
    bom = codecs.BOM_UTF8 if codec == "utf-8" else b""
    while block := fh.read(_BLOCK):
        on_bytes(len(block))
        if bom:
            if block.startswith(bom):
                block, offset = block[len(bom) :], len(bom)
            bom = b""
        data = carry + block
        if not sep:
            # Classic Mac Excel ends lines with a bare CR.
            sep = b"\n" if b"\n" in data else b"\r" if b"\r" in data else b""
            if not sep:
                carry = data
                continue
        *raw_lines, carry = data.split(sep)
        binary = b"\x00" in data  # one C scan per block; lines are searched only if it hits
        for raw in raw_lines:
            line_no += 1
            if binary and b"\x00" in raw:
                raise ContactImportError(
                    f"{where}: line {line_no} contains a NUL byte: this is binary data, not a "
                    "CSV text file. Nothing was imported.",
                    path=where,
                )
            try:
                text = raw.decode(codec)
            except UnicodeDecodeError as exc:
                raise _line_decode_error(where, encoding, line_no, offset, exc) from None
            offset += len(raw) + 1
            yield text + "\n"
    if carry:
        if b"\x00" in carry:
            raise ContactImportError(
                f"{where}: line {line_no + 1} contains a NUL byte: this is binary data, not a "
                "CSV text file. Nothing was imported.",
                path=where,
            )
        try:
            yield carry.decode(codec)
        except UnicodeDecodeError as exc:
            raise _line_decode_error(where, encoding, line_no + 1, offset, exc) from None


def _line_decode_error(
    where: str, encoding: str, line: int, offset: int, exc: UnicodeDecodeError
) -> EncodingDetectionError:
    raw = bytes(exc.object)
    hint = next(
        (
            f" It looks like {alt}: pass encoding='{alt}', or leave encoding unset to detect it."
            for alt in ("utf-8", "cp932")
            if not encoding.startswith(alt) and _decodes(raw, alt)
        ),
        "",
    )
    return EncodingDetectionError(
        f"{where} is not valid {encoding}: line {line} (byte {offset + exc.start}) cannot be "
        f"decoded ({exc.reason}).{hint} Nothing was imported."
    )


def _decodes(data: bytes, encoding: str) -> bool:
    try:
        data.decode(encoding)
    except UnicodeDecodeError:
        return False
    return True


# ---------------------------------------------------------------------------- sources


@dataclass(frozen=True)
class Columns:
    email: int
    name: int | None
    attributes: tuple[tuple[int, str], ...]
    width: int


Chunk = list[tuple[int, list[str]]]  # (spreadsheet row number, cells)


def _header_key(text: str) -> str:
    return _HEADER_NOISE.sub("", unicodedata.normalize("NFKC", text)).casefold()


def build_columns(header: Sequence[str], where: str) -> Columns:
    keys = [_header_key(h) for h in header]
    email = next((i for i, k in enumerate(keys) if k in _EMAIL_HEADERS), None)
    if email is None:
        shown = ", ".join(repr(h) for h in header) or "none"
        raise ContactImportError(
            f"{where} has no email column (columns: {shown}). Name the address column "
            "'email' or 'メールアドレス' and import again.",
            path=where,
        )
    name = next((i for i, k in enumerate(keys) if k in _NAME_HEADERS), None)
    attributes: list[tuple[int, str]] = []
    taken: dict[str, str] = {}
    for i, (raw, key) in enumerate(zip(header, keys, strict=True)):
        # Columns without a header (Excel's trailing commas) carry no attribute name.
        if i in (email, name) or not key:
            continue
        label = raw.strip().lstrip("\ufeff")
        if key in RESERVED_FIELDS:
            raise ContactImportError(
                f"{where}: column {label!r} has a name that segments use for a built-in field "
                f"({', '.join(sorted(RESERVED_FIELDS))}); rename the column "
                f"(e.g. 'customer_{key}') and import again.",
                path=where,
            )
        if key in taken:
            raise ContactImportError(
                f"{where}: columns {taken[key]!r} and {label!r} name the same attribute; "
                "rename one of them and import again.",
                path=where,
            )
        if len(label) > _KEY_MAX:
            raise ContactImportError(
                f"{where}: column name {label[:40]!r}… is longer than {_KEY_MAX} characters; "
                "shorten it and import again.",
                path=where,
            )
        taken[key] = label
        attributes.append((i, label))
    return Columns(email, name, tuple(attributes), len(header))


def open_csv(
    fh: IO[bytes], path: Path, encoding: str | None, on_bytes: _Counter
) -> tuple[str, list[str], Iterator[list[str]]]:
    where = str(path)
    head = fh.read(8)
    if head.startswith((b"PK\x03\x04", b"\xd0\xcf\x11\xe0")):
        raise ContactImportError(
            f"{where} is an Excel workbook, not a CSV: save it as 'CSV UTF-8', or pass "
            "pandas.read_excel(...) to import_contacts as a DataFrame.",
            path=where,
        )
    if head.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        raise ContactImportError(
            f"{where} is UTF-16 (Excel's 'Unicode text'), which is not supported: save it as "
            "'CSV UTF-8' and import that.",
            path=where,
        )
    used = _detect(lambda: _file_blocks(path), where) if encoding is None else encoding
    used = _canonical_encoding(used)
    fh.seek(0)
    lines = _iter_lines(fh, used, where, on_bytes)
    first = next(lines, None)
    if first is None or not first.strip():
        raise ContactImportError(
            f"{where} has no header row: the first line must name the columns, one of them "
            "'email' or 'メールアドレス'.",
            path=where,
        )
    delimiter = max(",\t;", key=first.count)  # a comma unless the header clearly says otherwise
    reader = csv.reader(chain((first,), lines), delimiter=delimiter)
    try:
        return used, next(reader), reader
    except csv.Error as exc:
        raise ContactImportError(f"{where} is not a readable CSV: {exc}", path=where) from exc


def csv_chunks(reader: Iterator[list[str]], where: str, size: int) -> Iterator[Chunk]:
    chunk: Chunk = []
    row = 1
    try:
        for cells in reader:
            row += 1
            chunk.append((row, cells))
            if len(chunk) >= size:
                yield chunk
                chunk = []
    except csv.Error as exc:
        raise ContactImportError(
            f"{where} is not a readable CSV at row {row + 1}: {exc}. Nothing was imported.",
            path=where,
        ) from exc
    if chunk:
        yield chunk


def frame_chunks(frame: pd.DataFrame, size: int) -> Iterator[Chunk]:
    for start in range(0, len(frame), size):
        values = frame.iloc[start : start + size].to_numpy(dtype=object).tolist()
        yield [(start + i + 2, [_cell_text(v) for v in row]) for i, row in enumerate(values)]


def _cell_text(value: object) -> str:
    if isinstance(value, str):
        return value
    if value is None or value is pd.NA or value is pd.NaT:
        return ""
    if isinstance(value, float):
        # pandas turns an int column with gaps into floats; 30.0 was typed as 30.
        if math.isnan(value):
            return ""
        return str(int(value)) if value.is_integer() else str(float(value))
    return str(value)


def open_file(path: Path) -> IO[bytes]:
    try:
        return path.open("rb")
    except FileNotFoundError:
        raise ContactImportError(f"no such file: {path}", path=str(path)) from None
    except IsADirectoryError:
        raise ContactImportError(f"{path} is a directory, not a CSV file", path=str(path)) from None
    except OSError as exc:
        raise ContactImportError(f"cannot read {path}: {exc.strerror}", path=str(path)) from None


def read_ahead(items: Iterator[_T], depth: int = 2) -> Generator[_T, None, None]:
    """``items`` produced by a worker thread, at most ``depth`` ahead of the consumer.

    Parsing (Python, holding the GIL) then overlaps the database's work on the previous
    chunk (SQLite's C code and network waits release the GIL). An exception in the worker is
    re-raised here; closing this generator, or an exception in its consumer, stops the worker
    and waits for it, so the source is never read after the caller has moved on.
    """
    handoff: queue.Queue[tuple[str, Any]] = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(kind: str, value: Any) -> bool:
        while not stop.is_set():
            try:
                handoff.put((kind, value), timeout=0.05)
            except queue.Full:
                continue
            return True
        return False

    def work() -> None:
        try:
            for item in items:
                if not put("item", item):
                    return
            put("end", None)
        except BaseException as exc:  # handed to the consumer, which re-raises it
            put("error", exc)
        finally:
            close = getattr(items, "close", None)
            if close is not None:
                close()

    worker = threading.Thread(target=work, name="mailkit-read-ahead", daemon=True)
    worker.start()
    try:
        while True:
            kind, value = handoff.get()
            if kind == "end":
                return
            if kind == "error":
                raise value
            yield value
    finally:
        stop.set()
        worker.join()
