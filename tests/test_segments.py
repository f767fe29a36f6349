from __future__ import annotations

import pandas as pd
import pytest
from lock_support import read_while_locked
from sqlalchemy import Engine, func, insert, select
from sqlalchemy.dialects import postgresql, sqlite

from mailkit.errors import SegmentError
from mailkit.segments import (
    BUILTIN_FIELDS,
    Segment,
    build_count_statement,
    compile_segment,
    count_segment,
    fetch_member_records,
    fetch_members,
    load_attribute_names,
    resolve_segment,
    select_members,
)
from mailkit.storage.schema import (
    contact_attributes,
    contacts,
    list_members,
    lists,
    suppressions,
)

# email -> (name, attributes, lists). "e" is suppressed and must never be a member.
PEOPLE: dict[str, tuple[str | None, dict[str, str], list[str]]] = {
    "a@example.jp": (
        "山田太郎",
        {
            "prefecture": "東京都",
            "gender": "F",
            "age": "34",
            "city": "Osaka",
            "部署": "営業",
            "e-mail flag": "y",
        },
        ["人事部"],
    ),
    "b@docomo.ne.jp": (
        "佐藤花子",
        {"prefecture": "東京都", "gender": "M", "age": "25", "city": "Kyoto", "部署": "人事"},
        [],
    ),
    "c@ezweb.ne.jp": (
        None,
        {"prefecture": "大阪府", "gender": "F", "age": "unknown", "city": "Tokyo"},
        [],
    ),
    "d@example.com": ("鈴木一郎", {"prefecture": "東京都"}, ["人事部", "営業部"]),
    "e@example.jp": (
        "田中次郎",
        {"prefecture": "東京都", "gender": "F", "age": "40", "city": "Osaka"},
        ["人事部"],
    ),
}
EVERYONE = {"a", "b", "c", "d"}
INJECTION = "x' OR 1=1 --"


def _number(value: str) -> float | None:
    try:
        return float(value)
    except ValueError:
        return None


def seed(db: Engine) -> dict[str, int]:
    """Insert PEOPLE straight into the tables; return short name ('a'...) -> contact id."""
    ids: dict[str, int] = {}
    with db.begin() as conn:
        list_ids = {
            name: conn.execute(insert(lists).values(name=name).returning(lists.c.id)).scalar_one()
            for name in ("人事部", "営業部", "空のリスト")
        }
        for email, (name, attrs, member_of) in PEOPLE.items():
            domain = email.split("@")[1]
            contact_id = conn.execute(
                insert(contacts)
                .values(email=email, name=name, domain=domain)
                .returning(contacts.c.id)
            ).scalar_one()
            ids[email[0]] = contact_id
            for key, value in attrs.items():
                conn.execute(
                    insert(contact_attributes).values(
                        contact_id=contact_id, key=key, value=value, value_num=_number(value)
                    )
                )
            for list_name in member_of:
                conn.execute(
                    insert(list_members).values(list_id=list_ids[list_name], contact_id=contact_id)
                )
        conn.execute(insert(suppressions).values(email="e@example.jp", reason="unsubscribe"))
    return ids


def members(db: Engine, expression: str) -> list[str]:
    segment = compile_segment(expression, load_attribute_names(db))
    with db.connect() as conn:
        return [row.email[0] for row in conn.execute(select_members(segment))]


@pytest.mark.parametrize(
    ("expression", "expected"),
    [
        ("prefecture == '東京都' and gender == 'F'", {"a"}),
        ("prefecture == '東京都'", {"a", "b", "d"}),
        ("prefecture != '東京都'", {"c"}),
        ("部署 == '営業'", {"a"}),
        ("`e-mail flag` == 'y'", {"a"}),
        ("`部署` == '人事'", {"b"}),
        # numeric literals compare value_num; "unknown" is not a number, so it is missing there
        ("age >= 30", {"a"}),
        ("age > 24.5", {"a", "b"}),
        ("age < 30", {"b"}),
        ("age <= 25", {"b"}),
        ("age == 34", {"a"}),
        ("age == 34.0", {"a"}),
        ("age != 34", {"b"}),
        ("age > -1", {"a", "b"}),
        ("30 <= age", {"a"}),
        ("20 <= age < 30", {"b"}),
        ("20 <= age < 40 and gender == 'F'", {"a"}),
        # string literals compare the stored text
        ("age == '34'", {"a"}),
        ("age == '34.0'", set()),
        ("age == 'unknown'", {"c"}),
        ("city in ['Osaka', 'Kyoto']", {"a", "b"}),
        ("city in ('Tokyo',)", {"c"}),
        ("city in []", set()),
        ("age in [25, 'unknown']", {"b", "c"}),
        ("city not in ['Osaka']", {"b", "c"}),
        ("city not in []", {"a", "b", "c"}),
        ("age not in [34]", {"b"}),
        # missing values: != and not in need the attribute; `not` is plain negation
        ("gender != 'M'", {"a", "c"}),
        ("not (gender == 'M')", {"a", "c", "d"}),
        ("not gender == 'M'", {"a", "c", "d"}),
        ("not (gender != 'M')", {"b", "d"}),
        ("gender == 'F' or 部署 == '人事'", {"a", "b", "c"}),
        ("prefecture == '東京都' and (gender == 'F' or age < 30)", {"a", "b"}),
        ("prefecture == '東京都'\n    and gender == 'M'  # multi-line, with a comment\n", {"b"}),
        ("prefecture == '東京都' \\\n and gender == 'M'", {"b"}),
        # built-in fields
        ("list == '人事部'", {"a", "d"}),
        ("list != '人事部'", {"b", "c"}),
        ("list in ['人事部', '営業部']", {"a", "d"}),
        ("list not in ['営業部']", {"a", "b", "c"}),
        ("list == '空のリスト'", set()),
        ("list == 'no such list'", set()),
        ("domain == 'docomo.ne.jp'", {"b"}),
        ("domain == 'DOCOMO.ne.jp'", {"b"}),
        ("domain in ['docomo.ne.jp', 'ezweb.ne.jp']", {"b", "c"}),
        ("domain not in ['docomo.ne.jp']", {"a", "c", "d"}),
        ("email == 'a@example.jp'", {"a"}),
        ("email == 'e@example.jp'", set()),
        ("name == '山田太郎'", {"a"}),
        ("name != '山田太郎'", {"b", "d"}),
        ("not (name == '山田太郎')", {"b", "c", "d"}),
        ("name in ['佐藤花子', '鈴木一郎']", {"b", "d"}),
        # everyone
        ("", EVERYONE),
        ("   ", EVERYONE),
        ("all", EVERYONE),
        ("all and not (gender == 'F')", {"b", "d"}),
        # a hostile literal is only a value
        (f'email == "{INJECTION}"', set()),
        (f'部署 == "{INJECTION}" or city in ["{INJECTION}"]', set()),
    ],
)
def test_expression_selects_expected_members(
    db: Engine, expression: str, expected: set[str]
) -> None:
    seed(db)
    found = members(db, expression)
    assert set(found) == expected
    assert found == sorted(found)  # ordered by id, which follows insertion order here


def test_suppressed_contacts_are_never_members(db: Engine) -> None:
    ids = seed(db)
    assert "e" not in members(db, "email == 'e@example.jp' or age >= 40 or all")
    assert count_segment(db, [ids["a"], ids["e"]]) == 1
    by_email = pd.DataFrame({"email": ["e@example.jp", "b@docomo.ne.jp", "nobody@x.jp"]})
    assert list(fetch_members(db, by_email)["email"]) == ["b@docomo.ne.jp"]
    by_id = pd.DataFrame({"id": [ids["e"], ids["c"]], "other": [1, 2]})
    assert list(fetch_members(db, by_id)["email"]) == ["c@ezweb.ne.jp"]


@pytest.mark.parametrize(
    "expression",
    ["", "prefecture == '東京都'", "age < 30 or list == '人事部'", "city == 'nowhere'"],
)
def test_count_equals_number_of_members(db: Engine, expression: str) -> None:
    seed(db)
    assert count_segment(db, expression) == len(fetch_members(db, expression))
    assert count_segment(db, expression) == len(members(db, expression))


def test_members_dataframe_has_contact_columns_and_one_per_attribute(db: Engine) -> None:
    ids = seed(db)
    frame = fetch_members(db, "prefecture == '東京都'")
    attributes = sorted(["prefecture", "gender", "age", "city", "部署", "e-mail flag"])
    assert list(frame.columns) == ["id", "email", "name", "domain", *attributes]
    assert list(frame["id"]) == [ids["a"], ids["b"], ids["d"]]
    assert frame["id"].dtype == "int64"
    a, b, d = frame.to_dict("records")
    assert (a["name"], a["domain"], a["部署"], a["e-mail flag"]) == (
        "山田太郎",
        "example.jp",
        "営業",
        "y",
    )
    assert a["age"] == "34"  # attributes are text as stored
    # missing attributes are None (not NaN), so templates see them as missing
    assert b["e-mail flag"] is None
    assert d["gender"] is None and d["age"] is None
    assert list(fetch_members(db, "prefecture == '東京都'", limit=2)["id"]) == [ids["a"], ids["b"]]


@pytest.mark.parametrize("batch", [1, 2, 10_000])
def test_streamed_members_are_the_dataframes_rows(db: Engine, batch: int) -> None:
    ids = seed(db)
    expression = "all"
    streamed = list(fetch_member_records(db, expression, batch=batch))
    assert streamed == fetch_members(db, expression).to_dict("records")
    assert [r["id"] for r in streamed] == [ids["a"], ids["b"], ids["c"], ids["d"]]
    assert all(type(r["id"]) is int for r in streamed)
    assert streamed[3]["gender"] is None  # missing, as in the DataFrame
    assert list(fetch_member_records(db, [])) == []
    with pytest.raises(ValueError, match="batch must be a positive int"):
        next(fetch_member_records(db, "all", batch=0))


def test_members_dataframe_without_members_or_attributes(db: Engine) -> None:
    empty = fetch_members(db, "")
    assert list(empty.columns) == ["id", "email", "name", "domain"]
    assert len(empty) == 0
    seed(db)
    none = fetch_members(db, "city == 'nowhere'")
    assert len(none) == 0 and "部署" in none.columns


def test_attribute_named_like_a_contact_column_gets_a_suffix(db: Engine) -> None:
    ids = seed(db)
    with db.begin() as conn:
        conn.execute(
            insert(contact_attributes).values(contact_id=ids["a"], key="name", value="ヤマダ")
        )
    frame = fetch_members(db, "email == 'a@example.jp'")
    assert frame.loc[0, "name"] == "山田太郎"
    assert frame.loc[0, "name_attr"] == "ヤマダ"
    assert members(db, "name == 'ヤマダ'") == []  # the built-in wins in expressions


def test_load_attribute_names(db: Engine) -> None:
    assert load_attribute_names(db) == set()
    seed(db)
    expected = {"prefecture", "gender", "age", "city", "部署", "e-mail flag"}
    assert load_attribute_names(db) == expected


def test_segments_given_as_ids_or_dataframes(db: Engine) -> None:
    ids = seed(db)
    assert count_segment(db, [ids["b"], ids["a"], ids["a"], 99999]) == 2
    assert count_segment(db, []) == 0
    frame = fetch_members(db, pd.Series([ids["d"], ids["b"]]))
    assert list(frame["email"]) == ["b@docomo.ne.jp", "d@example.com"]
    # a float column (an int column with gaps) of whole numbers is accepted
    assert count_segment(db, pd.DataFrame({"id": [float(ids["c"])]})) == 1
    # a members DataFrame round-trips
    again = fetch_members(db, fetch_members(db, "gender == 'F'"))
    assert list(again["email"]) == ["a@example.jp", "c@ezweb.ne.jp"]
    segment = resolve_segment(db, [ids["a"]])
    assert isinstance(segment, Segment) and "1 contact ids" in segment.expression
    assert resolve_segment(db, segment) is segment


def test_a_long_id_list_passes_sqlite_bind_parameter_limits(db: Engine) -> None:
    ids = seed(db)
    assert count_segment(db, range(1, 40_001)) == len(EVERYONE)
    assert max(ids.values()) < 40_001


def test_bad_segment_specs_are_refused(db: Engine) -> None:
    with pytest.raises(SegmentError, match="`id` or `email` column"):
        resolve_segment(db, pd.DataFrame({"address": ["a@example.jp"]}))
    with pytest.raises(SegmentError, match="whole numbers"):
        count_segment(db, [1, "2"])  # type: ignore[list-item]
    with pytest.raises(SegmentError, match="whole numbers"):
        count_segment(db, [True])
    with pytest.raises(SegmentError, match="cannot use a int"):
        count_segment(db, 3)  # type: ignore[arg-type]


ATTRIBUTES = {"prefecture", "gender", "age", "city", "部署", "e-mail flag"}


@pytest.mark.parametrize(
    ("expression", "message", "at"),
    [
        (
            "prefectre == '東京都'",
            "unknown field `prefectre`; did you mean `prefecture`?",
            "prefectre",
        ),
        ("部署 == '営業' and prefectre == 'x'", "did you mean `prefecture`", "prefectre"),
        ("部暑 == '営業'", "did you mean `部署`", "部暑"),
        ("`e-mail flg` == 'y'", "did you mean `e-mail flag`", "`e-mail flg`"),
        ("`e-mail flag` == 'y' and agee > 3", "unknown field `agee`", "agee"),
        ("prefecture == '東京都'\n  and agee > 3", "unknown field `agee`", "agee"),
        ("`部署` == 'y' and `e-mail flag` == {'a'}", "sets are not allowed", "{"),
        ("__import__('os')", "function calls are not allowed", "__import__"),
        ("age == __import__('os').getpid()", "function calls are not allowed", "__import__"),
        ("部署 == '営業' and email.__class__ == 'x'", "attribute access is not allowed", "email"),
        ("部署[0] == '営'", "subscripts are not allowed", "部署[0]"),
        ("age + 1 > 30", "arithmetic is not allowed (`age + 1`)", "+"),
        ("age > 30 * 2", "arithmetic is not allowed", "*"),
        ("部署 == '営業' and (", "syntax error: '(' was never closed", "("),
        ("部署 == '営業' and", "syntax error", ""),
        ("年齢 = 30", "syntax error", "="),
        ("True", "True is not a condition; to select every contact write `all`", "True"),
        ("部署 == '営業' or False", "False is not a condition", "False"),
        ("gender == True", "`True` is not allowed as a value", "True"),
        ("gender == None", "`None` is not allowed as a value", "None"),
        ("gender == b'F'", "a bytes literal is not allowed", "b'F'"),
        ("age < 部署", "`age < 部署` compares two fields", "部署"),
        ("`e-mail flag` == gender", "compares two fields", "gender"),
        ("1 == 1", "compares two literal values", "1"),
        ("部署 == '営業' and 1", "an int literal is not allowed", "1"),
        ("lambda: 1", "lambdas are not allowed", "lambda"),
        ("(部署 := 'x')", "assignment expressions (:=) are not allowed", "部署"),
        ("部署 == f'{gender}'", "f-strings are not allowed", "f'"),
        ("部署 == '営業' & age > 3", "`&` is not allowed; write `and`", "&"),
        ("~(部署 == '営業')", "`~` is not allowed; write `not`", "~"),
        ("部署 is None", "only ==, !=, <, <=, >, >=, in and not in are allowed", "is"),
        ("'営業' in 部署", "put the field on the left: 部署 in [...]", "'営業'"),
        ("部署 in '営業'", "`in` needs a list of values", "'営業'"),
        ("部署 == ['営業']", "use `in` to compare `部署` with a list", "["),
        ("list >= '人事部'", "`list` supports only ==, !=, in and not in", ">="),
        ("list == 3", "`list` is text: quote the value", "3"),
        ("email == 3", "`email` is text: quote the value", "3"),
        ("部署", "`部署` on its own is not a condition", "部署"),
        ("gender == -'F'", "a sign applies only to a number", "-"),
        ("age > 1e999", "numbers must be finite", "1e999"),
        ("部署 == 'x' and `e-mail", "unclosed backtick", "`"),
        ("`` == 'x'", "empty name in backticks", "`"),
        ("部署 == ('a' if gender == 'F' else 'b')", "IfExp is not allowed", "'a' if"),
    ],
)
def test_disallowed_expressions_raise_segment_error_at_the_token(
    expression: str, message: str, at: str
) -> None:
    with pytest.raises(SegmentError) as caught:
        compile_segment(expression, ATTRIBUTES)
    error = caught.value
    assert message in str(error)
    assert error.expression == expression
    # offsets are characters, not UTF-8 bytes, even after Japanese text
    assert error.offset == (expression.index(at) if at else len(expression))
    assert expression in str(error)  # the message shows the expression with a pointer


def test_unknown_field_lists_what_is_known() -> None:
    with pytest.raises(SegmentError) as caught:
        compile_segment("zzz == 1", {"age"})
    assert "did you mean" not in str(caught.value)
    assert "known fields: age, domain, email, list, name" in str(caught.value)
    assert {"email", "name", "domain", "list"} == BUILTIN_FIELDS


@pytest.mark.parametrize("dialect", [sqlite.dialect(), postgresql.dialect()])
def test_compiled_sql_holds_no_literal_from_the_expression(dialect: object) -> None:
    literals = ["東京都", "Osaka", "人事部", "e-mail flag", "prefecture", "docomo.ne.jp", "1=1"]
    expression = (
        "prefecture == '東京都' and age >= 31 and city in ['Osaka'] and list == '人事部' "
        f"and `e-mail flag` == 'y' and domain == 'docomo.ne.jp' and email != \"{INJECTION}\""
    )
    compiled = compile_segment(expression, ATTRIBUTES).clause.compile(dialect=dialect)  # type: ignore[arg-type]
    sql = str(compiled)
    for literal in [*literals, "31", "'y'", "x'"]:
        assert literal not in sql
    assert "東京都" in compiled.params.values()
    assert INJECTION in compiled.params.values()
    assert 31 in compiled.params.values()


def test_injection_literal_changes_nothing_in_the_database(db: Engine) -> None:
    seed(db)
    assert count_segment(db, f"email == '{INJECTION.replace(chr(39), chr(92) + chr(39))}'") == 0
    assert count_segment(db, f'prefecture == "{INJECTION}" or list == "{INJECTION}"') == 0
    with db.connect() as conn:
        assert conn.execute(select(func.count()).select_from(contacts)).scalar_one() == 5


def test_segment_sql_probes_indexes_instead_of_scanning_attributes(sqlite_db: Engine) -> None:
    seed(sqlite_db)
    segment = compile_segment(
        "prefecture == '東京都' and age >= 30 and not (gender == 'M') and list == '人事部'",
        load_attribute_names(sqlite_db),
    )
    stmt = build_count_statement(segment, "sqlite")
    with sqlite_db.connect() as conn:
        compiled = stmt.compile(dialect=conn.dialect)
        params = tuple(compiled.params[name] for name in compiled.positiontup or ())
        plan = conn.exec_driver_sql(f"EXPLAIN QUERY PLAN {compiled}", params).all()
    details = [row[-1] for row in plan]
    assert any(d.startswith("SEARCH contact_attributes USING") for d in details)
    assert not any(d.startswith(("SCAN contact_attributes", "SCAN list_members")) for d in details)
    assert not any(d.startswith("SCAN suppressions") for d in details)
    # contacts is walked in id order, as attribute rows are stored, not through the address or
    # domain index (which sends the look-ups to random places: 5x slower at 1M contacts).
    assert "SCAN contacts" in details, details
    assert "USE TEMP B-TREE FOR ORDER BY" not in details


def test_half_width_katakana_keys_are_found_despite_identifier_normalisation() -> None:
    # Python reads the identifier ﾌﾞﾓﾝ as ブモン (NFKC); the stored key stays half-width.
    compiled = compile_segment("ﾌﾞﾓﾝ == '営業'", {"ﾌﾞﾓﾝ"}).clause.compile()
    assert "ﾌﾞﾓﾝ" in compiled.params.values()
    with pytest.raises(SegmentError, match="did you mean `age`"):
        compile_segment("Age >= 30", {"age"})


def test_counting_and_listing_members_do_not_wait_for_a_writer(sqlite_db: Engine) -> None:
    # A campaign sending from the same SQLite file holds the write lock during each commit,
    # and an import holds it for longer. An analyst editing a segment meanwhile gets the
    # count of what is committed, at once, instead of queueing behind the writer (and holding
    # the lock itself for the whole count, which on a million contacts takes a second).
    ids = seed(sqlite_db)
    expression = "prefecture == '東京都'"
    before = count_segment(sqlite_db, expression)
    count, listed, by_ids, names = read_while_locked(
        sqlite_db,
        lambda: (
            count_segment(sqlite_db, expression),
            len(fetch_members(sqlite_db, expression)),
            count_segment(sqlite_db, [ids["a"], ids["b"]]),
            load_attribute_names(sqlite_db),
        ),
        ("DELETE FROM contact_attributes WHERE key = 'prefecture'", ()),
    )
    assert count == listed == before == 3  # the uncommitted delete is not seen
    assert by_ids == 2
    assert "prefecture" in names
