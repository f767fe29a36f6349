from __future__ import annotations

import email
import os
from datetime import UTC, datetime, timedelta, timezone
from email import policy
from email.message import EmailMessage

import pytest

from mailkit.errors import AddressError
from mailkit.messages import build_message, make_message_id, message_to_bytes, parse_address
from mailkit.templates import RenderedMessage, Template, build_context, render_template

HTML = "<html><body><p>山田 太郎 様</p><p>春のセールのご案内です。</p></body></html>"
TEXT = "山田 太郎 様\n\n春のセールのご案内です。\n"
SUBJECT = (
    "【重要】 山田 太郎様へ　春のセール 50% OFF のお知らせ ― 期間限定・先着順でご案内いたします"
)


def _rendered(subject: str = SUBJECT, html: str = HTML, text: str = TEXT) -> RenderedMessage:
    return RenderedMessage(subject=subject, html=html, text=text)


def _roundtrip(msg: EmailMessage) -> EmailMessage:
    parsed = email.message_from_bytes(message_to_bytes(msg), policy=policy.default)
    assert isinstance(parsed, EmailMessage)
    return parsed


def _body(part: EmailMessage) -> str:
    content = part.get_content()
    assert isinstance(content, str)
    return content.replace("\r\n", "\n")


def test_one_recipient_only_and_no_cc_or_bcc() -> None:
    msg = build_message(
        _rendered(),
        from_addr="news@example.jp",
        to_addr="taro@example.jp",
        reply_to="support@example.jp",
    )
    parsed = _roundtrip(msg)
    assert parsed.get_all("To") is not None and len(parsed.get_all("To") or []) == 1
    assert [a.addr_spec for a in parsed["To"].addresses] == ["taro@example.jp"]
    for header in ("Cc", "Bcc", "Resent-To", "Sender"):
        assert header not in parsed
    assert parsed["Reply-To"].addresses[0].addr_spec == "support@example.jp"


def test_japanese_subject_and_names_round_trip_within_line_limits() -> None:
    msg = build_message(
        _rendered(),
        from_addr="株式会社サンプル 広報部 <news@example.jp>",
        to_addr="taro@example.jp",
        to_name='山田, 太郎 ("タロウ")',
    )
    raw = message_to_bytes(msg)
    head, _, _ = raw.partition(b"\r\n\r\n")
    assert head.isascii()  # RFC 2047 took care of every non-ASCII header
    assert b"=?utf-8?" in head
    assert max(len(line) for line in raw.split(b"\r\n")) <= 78
    parsed = email.message_from_bytes(raw, policy=policy.default)
    assert parsed["Subject"] == SUBJECT
    assert parsed["To"].addresses[0].display_name == '山田, 太郎 ("タロウ")'
    assert parsed["From"].addresses[0].display_name == "株式会社サンプル 広報部"
    assert parsed["From"].addresses[0].addr_spec == "news@example.jp"


@pytest.mark.parametrize(
    "subject",
    [
        "春 夏 秋 冬 " * 20,
        "Re: " + "あ" * 150,
        "ASCII only subject that is rather long " * 4,
        "混在 mixed テキスト with spaces  and  double　全角",
    ],
)
def test_subjects_of_every_shape_round_trip(subject: str) -> None:
    subject = subject.strip()
    raw = message_to_bytes(
        build_message(_rendered(subject=subject), from_addr="a@example.jp", to_addr="b@x.jp")
    )
    assert max(len(line) for line in raw.split(b"\r\n")) <= 78
    assert email.message_from_bytes(raw, policy=policy.default)["Subject"] == subject


def test_rendered_template_goes_through_end_to_end() -> None:
    tpl = Template(None, "t", "{{ name }}様へ", "<p>{{ name }}様</p>", None, 1)
    rendered = render_template(tpl, build_context({"email": "t@example.jp", "name": "<山田>"}))
    parsed = _roundtrip(
        build_message(rendered, from_addr="a@example.jp", to_addr="t@example.jp", to_name="山田")
    )
    assert parsed["Subject"] == "<山田>様へ"
    html = parsed.get_body(("html",))
    assert html is not None and "&lt;山田&gt;様" in _body(html)


def test_multipart_alternative_structure_and_charsets() -> None:
    parsed = _roundtrip(build_message(_rendered(), from_addr="a@example.jp", to_addr="b@x.jp"))
    assert parsed.get_content_type() == "multipart/alternative"
    assert parsed["MIME-Version"] == "1.0"
    parts = list(parsed.iter_parts())
    assert [p.get_content_type() for p in parts] == ["text/plain", "text/html"]
    assert [p.get_content_charset() for p in parts] == ["utf-8", "utf-8"]
    assert all(p["Content-Transfer-Encoding"] in ("base64", "quoted-printable") for p in parts)
    assert _body(parts[0]) == TEXT
    assert _body(parts[1]).rstrip("\n") == HTML


def test_ascii_bodies_stay_7bit_and_mostly_ascii_bodies_use_quoted_printable() -> None:
    html = "<p>" + "plain words " * 50 + "café</p>"
    parsed = _roundtrip(
        build_message(
            _rendered(text="hello\n", html=html), from_addr="a@example.jp", to_addr="b@x.jp"
        )
    )
    plain, rich = parsed.iter_parts()
    assert plain["Content-Transfer-Encoding"] == "7bit"
    assert rich["Content-Transfer-Encoding"] == "quoted-printable"
    assert _body(rich).rstrip("\n") == html


def test_message_ids_are_unique_and_use_the_from_domain() -> None:
    ids = {make_message_id("example.jp") for _ in range(2000)}
    assert len(ids) == 2000
    assert all(i.startswith("<") and i.endswith("@example.jp>") for i in ids)
    msgs = [
        build_message(_rendered(), from_addr="広報 <news@mail.example.jp>", to_addr="b@x.jp")
        for _ in range(20)
    ]
    built = {m["Message-ID"] for m in msgs}
    assert len(built) == 20
    assert all(i.endswith("@mail.example.jp>") for i in built)


def test_forked_senders_make_different_message_ids() -> None:
    # campaign send --processes forks its senders from one parent: each must draw its own.
    read, write = os.pipe()
    children = []
    for _ in range(2):
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child
            os.close(read)
            os.write(write, (" ".join(make_message_id("x.jp") for _ in range(50)) + "\n").encode())
            os._exit(0)
        children.append(pid)
    os.close(write)
    for pid in children:
        os.waitpid(pid, 0)
    with os.fdopen(read) as lines:
        drawn = [set(line.split()) for line in lines]
    mine = {make_message_id("x.jp") for _ in range(50)}
    assert len(drawn) == 2 and all(len(ids) == 50 for ids in drawn)
    assert not (drawn[0] & drawn[1]) and not (mine & (drawn[0] | drawn[1]))


def test_given_message_id_and_date_are_used() -> None:
    when = datetime(2026, 4, 1, 9, 30, tzinfo=timezone(timedelta(hours=9)))
    parsed = _roundtrip(
        build_message(
            _rendered(),
            from_addr="a@example.jp",
            to_addr="b@x.jp",
            message_id="abc.123@example.jp",
            date=when,
        )
    )
    assert parsed["Message-ID"] == "<abc.123@example.jp>"
    assert parsed["Date"].datetime == when
    with pytest.raises(ValueError, match="timezone-aware"):
        build_message(_rendered(), from_addr="a@x.jp", to_addr="b@x.jp", date=datetime(2026, 1, 1))


def test_date_defaults_to_now() -> None:
    before = datetime.now(UTC).replace(microsecond=0)
    parsed = _roundtrip(build_message(_rendered(), from_addr="a@example.jp", to_addr="b@x.jp"))
    assert before <= parsed["Date"].datetime <= datetime.now(UTC)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"from_addr": "news@example.jp\r\nBcc: victim@example.com"},
        {"to_addr": "taro@example.jp\nBcc: victim@example.com"},
        {"reply_to": "a@example.jp\r\nX-Evil: 1"},
        {"message_id": "<a@b>\r\nBcc: victim@example.com"},
        {"headers": {"X-Campaign": "spring\r\nBcc: victim@example.com"}},
        {"headers": {"X-Campaign\r\nBcc": "victim@example.com"}},
        {"headers": {"Bcc": "victim@example.com"}},
        {"headers": {"cc": "victim@example.com"}},
        {"headers": {"To": "victim@example.com"}},
        {"headers": {"Bad:Name": "x"}},
        {"headers": {"名前": "x"}},
    ],
)
def test_header_injection_is_refused(kwargs: dict[str, object]) -> None:
    args: dict[str, object] = {"from_addr": "news@example.jp", "to_addr": "taro@example.jp"}
    args.update(kwargs)
    with pytest.raises(AddressError) as info:
        build_message(_rendered(), **args)  # type: ignore[arg-type]
    assert isinstance(info.value, ValueError)


def test_a_subject_with_a_line_break_is_refused() -> None:
    with pytest.raises(AddressError, match="Subject"):
        build_message(
            _rendered(subject="件名\r\nBcc: victim@example.com"),
            from_addr="a@example.jp",
            to_addr="b@x.jp",
        )


def test_to_name_from_data_is_collapsed_not_refused() -> None:
    parsed = _roundtrip(
        build_message(
            _rendered(), from_addr="a@example.jp", to_addr="b@x.jp", to_name="山田\r\n太郎\n"
        )
    )
    assert parsed["To"].addresses[0].display_name == "山田 太郎"
    assert "Bcc" not in parsed


@pytest.mark.parametrize(
    "value",
    ["", "not-an-address", "a@", "@example.jp", "a b@example.jp", "a@x.jp, b@x.jp", "x <a@x.jp"],
)
def test_malformed_addresses_raise_address_error(value: str) -> None:
    with pytest.raises(AddressError, match="From"):
        build_message(_rendered(), from_addr=value, to_addr="b@x.jp")


def test_address_parsing() -> None:
    named = parse_address("山田 <Yamada@Example.JP>")
    assert (named.display_name, named.addr_spec) == ("山田", "Yamada@Example.JP")
    assert parse_address("a@example.jp").display_name == ""
    assert parse_address("a@例え.jp").domain == "xn--r8jz45g.jp"
    with pytest.raises(AddressError, match="SMTPUTF8"):
        parse_address("山田@example.jp")


def test_extra_headers_are_kept_literally_even_when_long() -> None:
    url = "https://track.example.com/u/" + "a" * 120
    unsubscribe = f"<{url}>, <mailto:unsubscribe@example.jp?subject=unsub>"
    raw = message_to_bytes(
        build_message(
            _rendered(),
            from_addr="a@example.jp",
            to_addr="b@x.jp",
            headers={
                "List-Unsubscribe": unsubscribe,
                "List-Unsubscribe-Post": "List-Unsubscribe=One-Click",
                "X-Campaign-Name": "春のセール",
            },
        )
    )
    assert f"List-Unsubscribe: <{url}>,\r\n <mailto:".encode() in raw
    assert max(len(line) for line in raw.split(b"\r\n")) <= 998
    parsed = email.message_from_bytes(raw, policy=policy.default)
    assert parsed["List-Unsubscribe"] == unsubscribe
    assert parsed["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
    assert parsed["X-Campaign-Name"] == "春のセール"


def test_bytes_use_crlf_only() -> None:
    raw = message_to_bytes(build_message(_rendered(), from_addr="a@example.jp", to_addr="b@x.jp"))
    assert b"\n" not in raw.replace(b"\r\n", b"")
    assert b"\r" not in raw.replace(b"\r\n", b"")


# -- the campaign skeleton ------------------------------------------------------------------------

SKELETON_CASES = [
    (SUBJECT, "山田 太郎", HTML, TEXT),
    ("Plain ASCII subject", None, "<p>hello</p>", "hello\n"),
    ("ASCII that looks like =?utf-8?q?x?= an encoded word", "Taro Yamada", HTML, TEXT),
    ("Re: " + "あ" * 150, '山田, 太郎 ("タロウ")', "<p>" + "café " * 400 + "</p>", "x" * 2000),
    ("混在 mixed テキスト", "O'Brien, Pat", "<p>.leading dot\n.line</p>", ".\n..\n"),
    ("long ascii " * 20, "Name With Spaces", "<p>\r\nCRLF\r\n</p>", "a\r\nb\r\n"),
]


@pytest.mark.parametrize(
    "text",
    [
        "ascii\rbare CR\x0bvertical tab\x0cform feed\x1cfile sep\r\nCRLF\nLF",
        "mostly ascii, one é\rbare CR\x0b\x0c\x85NEL\u2028LS\u2029PS\r\n" * 20,
        "日本語\rの\x0bテキスト\x0c\u2028改行\r\n",
    ],
    ids=["7bit", "quoted-printable", "base64"],
)
def test_skeleton_bytes_use_crlf_only_whatever_the_line_breaks(text: str) -> None:
    # The transport relies on it (SMTPConnection.send(crlf=True) skips the check).
    from mailkit.messages import build_skeleton

    skeleton = build_skeleton(from_addr="news@example.jp", reply_to=None)
    raw = skeleton.build(
        _rendered(text=text, html="<p>" + text + "</p>"),
        to_addr="b@x.jp",
        message_id="<a.1@example.jp>",
    )
    rest = raw.replace(b"\r\n", b"")
    assert b"\n" not in rest and b"\r" not in rest


@pytest.mark.parametrize(("subject", "name", "html", "text"), SKELETON_CASES)
def test_skeleton_reads_the_same_as_build_message(
    subject: str, name: str | None, html: str, text: str
) -> None:
    from mailkit.messages import build_skeleton

    rendered = _rendered(subject=subject, html=html, text=text)
    headers = {
        "List-Unsubscribe": "<https://t.example.jp/u/" + "z" * 90 + ">",
        "List-Unsubscribe-Post": "List-Unsubscribe=One-Click",
    }
    when = datetime(2026, 4, 1, 9, 30, tzinfo=timezone(timedelta(hours=9)))
    common = {"to_addr": "taro@example.jp", "to_name": name, "message_id": "<a.1@example.jp>"}
    reference = _roundtrip(
        build_message(
            rendered,
            from_addr="株式会社サンプル <news@example.jp>",
            reply_to="support@example.jp",
            date=when,
            headers=headers,
            **common,  # type: ignore[arg-type]
        )
    )
    skeleton = build_skeleton(
        from_addr="株式会社サンプル <news@example.jp>", reply_to="support@example.jp"
    )
    raw = skeleton.build(rendered, date=when, headers=headers, **common)  # type: ignore[arg-type]
    assert b"\n" not in raw.replace(b"\r\n", b"") and raw.isascii()
    lines = raw.split(b"\r\n")
    assert max(len(line) for line in lines) <= 998
    head = raw.partition(b"\r\n\r\n")[0]
    # Only a single long word (the URL) may pass 78 columns in the header.
    assert all(len(line) <= 78 or b"https://" in line for line in head.split(b"\r\n"))
    parsed = email.message_from_bytes(raw, policy=policy.default)
    for header in (
        "From",
        "Reply-To",
        "To",
        "Date",
        "Message-ID",
        "List-Unsubscribe",
        "List-Unsubscribe-Post",
        "MIME-Version",
    ):
        assert str(parsed[header]) == str(reference[header]), header
    if "=?" in subject:
        # Written literally, text that looks like an encoded word is decoded by readers
        # (build_message has that flaw); the skeleton encodes it so it reads as written.
        assert parsed["Subject"] == subject
    else:
        assert parsed["Subject"] == reference["Subject"]
    assert parsed.get_content_type() == "multipart/alternative"
    for kind in ("plain", "html"):
        mine, theirs = parsed.get_body((kind,)), reference.get_body((kind,))
        assert mine is not None and theirs is not None
        assert _body(mine) == _body(theirs)
        assert mine.get_content_charset() == "utf-8"


def test_skeleton_refuses_header_injection_like_build_message() -> None:
    from mailkit.messages import build_skeleton

    skeleton = build_skeleton(from_addr="news@example.jp")
    for kwargs in (
        {"to_addr": "taro@example.jp\r\nBcc: victim@example.com"},
        {"headers": {"X-Campaign": "a\r\nBcc: victim@example.com"}},
        {"headers": {"Bcc": "victim@example.com"}},
        {"message_id": "<a@b>\r\nBcc: x@y"},
    ):
        args: dict[str, object] = {"to_addr": "taro@example.jp", "message_id": "<a@b.jp>"}
        args.update(kwargs)
        with pytest.raises(AddressError):
            skeleton.build(_rendered(), **args)  # type: ignore[arg-type]
    with pytest.raises(AddressError, match="Subject"):
        skeleton.build(_rendered(subject="x\r\nBcc: y@z"), to_addr="a@b.jp", message_id="<a@b>")
    with pytest.raises(AddressError):
        build_skeleton(from_addr="news@example.jp\r\nBcc: victim@example.com")


@pytest.mark.parametrize("size", [0, 1, 56, 57, 58, 114, 4500])
def test_base64_lines_match_the_stdlib(size: int) -> None:
    import base64

    from mailkit.messages import _base64_lines

    data = (bytes(range(256)) * 20)[:size]
    assert _base64_lines(data) == base64.encodebytes(data).replace(b"\n", b"\r\n")
