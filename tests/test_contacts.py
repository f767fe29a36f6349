"""Contact import, validation, dedupe, lists and suppressions on real SQLite and PostgreSQL."""

from __future__ import annotations

import json
import random
from datetime import datetime
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
from email_validator import EmailNotValidError, validate_email
from sqlalchemy import Engine, func, insert, select

from mailkit.contacts import (
    ImportReport,
    RejectedRow,
    detect_encoding,
    import_contacts,
    load_contacts,
    load_lists,
    load_suppressions,
    normalize_email,
    save_suppression,
)
from mailkit.errors import ContactImportError, EncodingDetectionError, NotFoundError
from mailkit.storage.schema import contact_attributes, contacts, list_members, lists, utcnow

JAPANESE_CSV = (
    "メールアドレス,氏名,都道府県,年齢\r\n"
    "taro@example.jp,山田太郎,東京都,30\r\n"
    "hanako@example.co.jp,佐藤花子,大阪府,030\r\n"
    "jiro@example.com,鈴木次郎,北海道,\r\n"
)


def write(path: Path, text: str, encoding: str = "utf-8") -> Path:
    path.write_bytes(text.encode(encoding))
    return path


def contact_table(db: Engine) -> dict[str, dict[str, Any]]:
    with db.connect() as conn:
        rows = conn.execute(select(contacts)).mappings().all()
    return {row["email"]: dict(row) for row in rows}


def attribute_table(db: Engine) -> dict[tuple[str, str], tuple[str, float | None]]:
    query = select(
        contacts.c.email,
        contact_attributes.c.key,
        contact_attributes.c.value,
        contact_attributes.c.value_num,
    ).join(contacts, contacts.c.id == contact_attributes.c.contact_id)
    with db.connect() as conn:
        return {(e, k): (v, n) for e, k, v, n in conn.execute(query)}


def table_counts(db: Engine) -> tuple[int, ...]:
    with db.connect() as conn:
        return tuple(
            conn.execute(select(func.count()).select_from(t)).scalar_one()
            for t in (contacts, contact_attributes, lists, list_members)
        )


# ---------------------------------------------------------------------------- pure helpers


def test_detect_encoding_tells_bom_utf8_and_cp932_apart() -> None:
    assert detect_encoding("email\r\n".encode("utf-8-sig")) == "utf-8-sig"
    assert detect_encoding(b"email,name\r\na@example.com,x\r\n") == "utf-8"
    assert detect_encoding("氏名,東京都".encode()) == "utf-8"
    assert detect_encoding(JAPANESE_CSV.encode("cp932")) == "cp932"


def test_detect_encoding_says_where_neither_candidate_decodes() -> None:
    data = b"email\nok@example.com\nbad\x81\x7f@example.com\n"
    with pytest.raises(EncodingDetectionError) as info:
        detect_encoding(data)
    message = str(info.value)
    assert "utf-8" in message and "cp932" in message
    assert "line 3" in message
    assert isinstance(info.value, UnicodeError)


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("  Taro.Yamada@EXAMPLE.CO.JP ", "Taro.Yamada@example.co.jp"),
        ("a+tag@Sub.Example.com", "a+tag@sub.example.com"),
        ("INFO@example.com", "info@example.com"),  # RFC 2142 role mailbox: email-validator's rule
        ("山田@例え.jp", "山田@例え.jp"),
        ("user@XN--R8JZ45G.JP", "user@例え.jp"),
    ],
)
def test_normalize_email_strips_and_lowercases_the_domain(raw: str, expected: str) -> None:
    assert normalize_email(raw) == expected


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        ("", "empty address"),
        ("   ", "empty address"),
        ("foo@", "something after the @-sign"),
        ("a@@b", "invalid characters"),
        ("a b@example.com", "SPACE"),
        ("x@foo.invalid", "special-use"),
        ("ｙａｍａ＠example.com", "full-width"),
    ],
)
def test_normalize_email_rejects_with_a_human_reason(raw: str, reason: str) -> None:
    with pytest.raises(ValueError, match=reason):
        normalize_email(raw)


def test_normalize_email_agrees_with_email_validator_on_tricky_and_random_input() -> None:
    # The fast path for plain ASCII addresses must never disagree with email-validator.
    rng = random.Random(7)
    alphabet = "aZ9.-_+@!%'`~xn-[]\"() \u00e9例"
    samples = [
        "a..b@example.com",
        ".a@example.com",
        "a.@example.com",
        "a@-example.com",
        "a@example-.com",
        "a@example.c0m",
        "a@example.123",
        "a@ab--cd.com",
        "a@xn--abc.com",
        "a@sub.localhost",
        "a@foo.arpa",
        "a@" + "x" * 64 + ".com",
        "x" * 65 + "@example.com",
        "x" * 250 + "@example.com",
        "Postmaster@Example.com",
        "a@example.com.",
        "a@e.x",
        "a@1.x",
        "a@e.x1",
    ]
    for _ in range(3000):
        local = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 6)))
        domain = "".join(rng.choice("ab-.9XN") for _ in range(rng.randint(0, 9)))
        samples.append(f"{local}@{domain}{rng.choice(['', '.com', '.jp', '.co.jp', '.invalid'])}")
    for raw in samples:
        try:
            expected: str | None = validate_email(
                raw.strip(), check_deliverability=False
            ).normalized
        except EmailNotValidError:
            expected = None
        try:
            got: str | None = normalize_email(raw)
        except ValueError:
            got = None
        assert got == expected, raw


# ---------------------------------------------------------------------------- CSV import


def test_cp932_file_with_japanese_names_is_detected_and_imported(
    db: Engine, tmp_path: Path
) -> None:
    path = write(tmp_path / "会員.csv", JAPANESE_CSV, "cp932")
    report = import_contacts(db, path)
    assert report.encoding == "cp932"
    assert (report.rows, report.added, report.updated, report.unchanged) == (3, 3, 0, 0)
    assert report.rejected == ()
    assert report.source == str(path)
    frame = load_contacts(db).set_index("email")
    assert list(frame.columns) == ["id", "name", "domain", "年齢", "都道府県"]
    assert frame.loc["taro@example.jp", "name"] == "山田太郎"
    assert frame.loc["taro@example.jp", "都道府県"] == "東京都"
    assert frame.loc["hanako@example.co.jp", "domain"] == "example.co.jp"
    assert pd.isna(frame.loc["jiro@example.com", "年齢"])  # empty cells are not stored
    attrs = attribute_table(db)
    assert attrs[("taro@example.jp", "年齢")] == ("30", 30.0)
    assert attrs[("hanako@example.co.jp", "年齢")] == ("030", 30.0)
    assert attrs[("taro@example.jp", "都道府県")] == ("東京都", None)
    assert ("jiro@example.com", "年齢") not in attrs


def test_shift_jis_named_explicitly_reads_cp932_extensions(db: Engine, tmp_path: Path) -> None:
    path = write(tmp_path / "c.csv", "email,会社\nx@example.jp,㈱山田①\n", "cp932")
    report = import_contacts(db, path, encoding="Shift_JIS")
    assert report.encoding == "cp932"
    assert attribute_table(db)[("x@example.jp", "会社")][0] == "㈱山田①"


def test_utf8_bom_file_whose_first_header_is_the_email_column(db: Engine, tmp_path: Path) -> None:
    path = write(
        tmp_path / "bom.csv", "E-mail,Name,prefecture\nA@Example.COM,Ann,東京都\n", "utf-8-sig"
    )
    report = import_contacts(db, path)
    assert report.encoding == "utf-8-sig"
    assert report.added == 1
    row = contact_table(db)["A@example.com"]
    assert (row["name"], row["domain"]) == ("Ann", "example.com")
    assert attribute_table(db)[("A@example.com", "prefecture")] == ("東京都", None)


def test_utf8_named_for_a_bom_file_still_finds_the_email_column(db: Engine, tmp_path: Path) -> None:
    path = write(tmp_path / "bom.csv", "email\na@example.com\n", "utf-8-sig")
    assert import_contacts(db, path, encoding="utf-8").added == 1


def test_explicit_wrong_encoding_fails_clearly_and_changes_nothing(
    db: Engine, tmp_path: Path
) -> None:
    import_contacts(db, write(tmp_path / "first.csv", "email,plan\nold@example.com,basic\n"))
    before = (table_counts(db), contact_table(db), attribute_table(db))
    path = write(tmp_path / "sjis.csv", JAPANESE_CSV + "old@example.com,,,,\n", "cp932")
    with pytest.raises(EncodingDetectionError) as info:
        import_contacts(db, path, encoding="utf-8", list_name="春")
    message = str(info.value)
    assert "utf-8" in message and "line 1" in message
    assert "cp932" in message  # the hint names the encoding that would work
    assert (table_counts(db), contact_table(db), attribute_table(db)) == before


def test_a_chunk_that_fails_to_decode_rolls_back_the_chunks_before_it(
    db: Engine, tmp_path: Path
) -> None:
    good = "".join(f"user{i}@example.com,User {i}\n" for i in range(6))
    data = b"email,name\n" + good.encode() + "late@example.jp,山田\n".encode("cp932")
    path = tmp_path / "mixed.csv"
    path.write_bytes(data)
    with pytest.raises(EncodingDetectionError, match=r"line 8"):
        import_contacts(db, path, encoding="utf-8", chunk_size=2, list_name="spring")
    assert table_counts(db) == (0, 0, 0, 0)
    # Detected, the same file is CP932 throughout and imports whole.
    report = import_contacts(db, path, chunk_size=2)
    assert (report.encoding, report.added) == ("cp932", 7)


def test_bad_rows_are_reported_with_row_number_value_and_reason(db: Engine, tmp_path: Path) -> None:
    text = (
        "email,name\n"
        "good@example.com,Good\n"  # row 2
        ",No Address\n"  # row 3
        "foo@,Foo\n"  # row 4
        "a@@b,AtAt\n"  # row 5
        "a b@example.com,Space\n"  # row 6
        "\n"  # row 7: blank, not a row
        "also.good@example.com,Also\n"  # row 8
        "x@example.com,X,extra\n"  # row 9: more cells than the header
    )
    report = import_contacts(db, write(tmp_path / "bad.csv", text))
    assert report.rows == 7
    assert report.added == 2
    by_row = {r.row: r for r in report.rejected}
    assert sorted(by_row) == [3, 4, 5, 6, 9]
    assert by_row[3] == RejectedRow(3, "", "empty address")
    assert by_row[4].value == "foo@" and "after the @-sign" in by_row[4].reason
    assert by_row[5].value == "a@@b" and "@" in by_row[5].reason
    assert by_row[6].value == "a b@example.com" and "SPACE" in by_row[6].reason
    assert "3 cells" in by_row[9].reason
    assert report.rows == report.added + report.updated + report.unchanged + len(report.rejected)
    assert set(contact_table(db)) == {"good@example.com", "also.good@example.com"}


def test_duplicates_within_the_file_are_reported_against_the_first_row(
    db: Engine, tmp_path: Path
) -> None:
    text = (
        "email,name\n"
        "Taro@Example.com,First\n"  # row 2
        "hanako@example.com,Hanako\n"  # row 3
        " Taro@example.COM ,Second\n"  # row 4: same address once normalised
        "taro@example.com,Lower\n"  # row 5: local part case is kept, so a distinct address
    )
    report = import_contacts(db, write(tmp_path / "dup.csv", text), chunk_size=2)
    assert report.added == 3
    assert report.rejected == (RejectedRow(4, " Taro@example.COM ", "duplicate of row 2"),)
    assert contact_table(db)["Taro@example.com"]["name"] == "First"


def test_reimporting_the_same_file_changes_nothing(db: Engine, tmp_path: Path) -> None:
    path = write(tmp_path / "m.csv", JAPANESE_CSV, "cp932")
    first = import_contacts(db, path, list_name="会員")
    before = (contact_table(db), attribute_table(db), table_counts(db))
    again = import_contacts(db, path, list_name="会員")
    assert (first.added, first.updated, first.unchanged) == (3, 0, 0)
    assert (again.rows, again.added, again.updated, again.unchanged) == (3, 0, 0, 3)
    assert (contact_table(db), attribute_table(db), table_counts(db)) == before


def test_updating_an_existing_contact_merges_name_and_attributes(
    db: Engine, tmp_path: Path
) -> None:
    import_contacts(
        db,
        write(tmp_path / "a.csv", "email,name,prefecture,age\nk@example.com,Kenji,東京都,30\n"),
    )
    old = contact_table(db)["k@example.com"]
    text = "email,name,prefecture,age,plan\nk@example.com,,,31,gold\nnew@example.com,New,,,\n"
    report = import_contacts(db, write(tmp_path / "b.csv", text))
    assert (report.added, report.updated, report.unchanged) == (1, 1, 0)
    now = contact_table(db)["k@example.com"]
    assert now["name"] == "Kenji"  # an empty cell keeps the stored value
    assert now["id"] == old["id"] and now["created_at"] == old["created_at"]
    assert now["updated_at"] > old["updated_at"]
    attrs = attribute_table(db)
    assert attrs[("k@example.com", "prefecture")] == ("東京都", None)
    assert attrs[("k@example.com", "age")] == ("31", 31.0)
    assert attrs[("k@example.com", "plan")] == ("gold", None)
    assert [k for e, k in attrs if e == "new@example.com"] == []
    renamed = import_contacts(db, write(tmp_path / "c.csv", "email,氏名\nk@example.com,Ken\n"))
    assert renamed.updated == 1 and contact_table(db)["k@example.com"]["name"] == "Ken"


def test_numeric_attribute_values_get_value_num(db: Engine, tmp_path: Path) -> None:
    values = ["30", "030", "-1.5", ".5", "３０", "東京", "1e3", "1,234", "090-1234-5678", "nan"]
    text = "email,v\n" + "".join(f'u{i}@example.com,"{v}"\n' for i, v in enumerate(values))
    import_contacts(db, write(tmp_path / "n.csv", text))
    attrs = attribute_table(db)
    got = {
        attrs[(f"u{i}@example.com", "v")][0]: attrs[(f"u{i}@example.com", "v")][1]
        for i in range(len(values))
    }
    assert got == {
        "30": 30.0,
        "030": 30.0,
        "-1.5": -1.5,
        ".5": 0.5,
        "３０": 30.0,
        "東京": None,
        "1e3": None,
        "1,234": None,
        "090-1234-5678": None,
        "nan": None,
    }


@pytest.mark.parametrize("column", ["ID", "domain", " List ", "E-Mail"])
def test_reserved_column_names_are_refused_before_anything_changes(
    db: Engine, tmp_path: Path, column: str
) -> None:
    path = write(tmp_path / "r.csv", f"email,{column}\na@example.com,1\n")
    with pytest.raises(ContactImportError, match="rename the column") as info:
        import_contacts(db, path, list_name="x")
    assert repr(column.strip()) in str(info.value)
    assert table_counts(db) == (0, 0, 0, 0)


@pytest.mark.parametrize(
    ("content", "match"),
    [
        (b"", "no header row"),
        (b"name,prefecture\nTaro,Tokyo\n", r"no email column \(columns: 'name', 'prefecture'\)"),
        (b"PK\x03\x04\x14\x00\x06\x00rest-of-an-xlsx", "Excel workbook"),
        (b"email,plan,Plan\na@example.com,x,y\n", "name the same attribute"),
        (b"email\na@example.com\nb\x00@example.com\n", "line 3 contains a NUL byte"),
    ],
)
def test_unreadable_files_raise_and_change_nothing(
    db: Engine, tmp_path: Path, content: bytes, match: str
) -> None:
    path = tmp_path / "f.csv"
    path.write_bytes(content)
    with pytest.raises(ContactImportError, match=match):
        import_contacts(db, path)
    assert table_counts(db) == (0, 0, 0, 0)


def test_missing_file_and_unknown_encoding_raise(db: Engine, tmp_path: Path) -> None:
    with pytest.raises(ContactImportError, match="no such file"):
        import_contacts(db, tmp_path / "nope.csv")
    path = write(tmp_path / "a.csv", "email\na@example.com\n")
    with pytest.raises(ContactImportError, match="unknown encoding 'klingon'"):
        import_contacts(db, path, encoding="klingon")
    assert table_counts(db) == (0, 0, 0, 0)


def test_tab_separated_and_bare_cr_files(db: Engine, tmp_path: Path) -> None:
    tsv = write(tmp_path / "t.tsv", "氏名\tメールアドレス\n山田\ty@example.jp\n")
    mac = write(tmp_path / "m.csv", 'email,note\r"m@example.jp","two\rlines"\r')
    assert import_contacts(db, tsv).added == 1
    assert import_contacts(db, mac).added == 1
    assert contact_table(db)["y@example.jp"]["name"] == "山田"
    assert attribute_table(db)[("m@example.jp", "note")][0] == "two\nlines"


# ---------------------------------------------------------------------------- DataFrames, lists


def test_dataframe_import_uses_position_plus_two_as_row_number(db: Engine) -> None:
    frame = pd.DataFrame(
        {
            "Email": ["a@example.com", "broken", None, "b@example.com"],
            "Full Name": ["Ann", "Bad", "Nobody", None],
            "age": [30, 40, 50, None],
            "score": [1.5, None, 2.0, 3.0],
        },
        index=[10, 11, 12, 13],
    )
    report = import_contacts(db, frame, progress=True)
    assert (report.source, report.encoding) == ("DataFrame", None)
    assert (report.rows, report.added) == (4, 2)
    assert [(r.row, r.value) for r in report.rejected] == [(3, "broken"), (4, "")]
    assert contact_table(db)["a@example.com"]["name"] == "Ann"
    assert contact_table(db)["b@example.com"]["name"] is None
    attrs = attribute_table(db)
    assert attrs[("a@example.com", "age")] == ("30", 30.0)  # 30.0 in a float column was 30
    assert attrs[("a@example.com", "score")] == ("1.5", 1.5)
    assert ("b@example.com", "age") not in attrs


def test_list_membership_and_loading_by_list(db: Engine, tmp_path: Path) -> None:
    path = write(tmp_path / "m.csv", JAPANESE_CSV, "cp932")
    first = import_contacts(db, path, list_name="2024春セミナー")
    assert first.list_name == "2024春セミナー"
    other = write(tmp_path / "o.csv", "email\ntaro@example.jp\nsolo@example.com\n")
    report = import_contacts(db, other, list_name="VIP")
    # taro is already stored with the same data: joining a list is still an update.
    assert (report.added, report.updated, report.unchanged) == (1, 1, 0)
    assert load_lists(db).to_dict("records") == [
        {"name": "2024春セミナー", "members": 3},
        {"name": "VIP", "members": 2},
    ]
    vip = load_contacts(db, list_name="VIP")
    assert sorted(vip["email"]) == ["solo@example.com", "taro@example.jp"]
    assert vip.set_index("email").loc["taro@example.jp", "都道府県"] == "東京都"
    assert len(load_contacts(db)) == 4
    with pytest.raises(NotFoundError):
        load_contacts(db, list_name="missing")


def test_load_functions_on_an_empty_store(db: Engine) -> None:
    assert list(load_contacts(db).columns) == ["id", "email", "name", "domain"]
    assert load_contacts(db).empty and load_lists(db).empty and load_suppressions(db).empty
    with db.begin() as conn:
        conn.execute(insert(lists).values(name="empty", created_at=utcnow()))
    assert load_lists(db).to_dict("records") == [{"name": "empty", "members": 0}]
    assert load_contacts(db, list_name="empty").empty


def test_report_serialises_to_json_and_has_a_short_repr(db: Engine, tmp_path: Path) -> None:
    text = "email\n" + "".join(f"bad{i}\n" for i in range(8)) + "ok@example.com\n"
    report = import_contacts(db, write(tmp_path / "r.csv", text))
    data = json.loads(json.dumps(report.to_dict()))
    assert data["added"] == 1 and len(data["rejected"]) == 8
    assert data["rejected"][0] == {"row": 2, "value": "bad0", "reason": report.rejected[0].reason}
    assert "3 more" in repr(report) and isinstance(report, ImportReport)


# ---------------------------------------------------------------------------- suppressions


def test_save_suppression_is_idempotent_and_normalises(db: Engine) -> None:
    assert save_suppression(db, " Taro@EXAMPLE.jp", reason="bounce", detail="5.1.1", campaign_id=7)
    assert not save_suppression(db, "Taro@example.jp", reason="complaint")
    assert save_suppression(db, "not an address@@x", reason="manual")
    frame = load_suppressions(db)
    assert list(frame.columns) == ["email", "reason", "detail", "campaign_id", "created_at"]
    first = frame.set_index("email").loc["Taro@example.jp"]
    assert (first["reason"], first["detail"], first["campaign_id"]) == ("bounce", "5.1.1", 7)
    assert isinstance(first["created_at"], datetime) and first["created_at"].tzinfo is not None
    assert len(frame) == 2
    with pytest.raises(ValueError, match="reason"):
        save_suppression(db, "a@example.com", reason="")
