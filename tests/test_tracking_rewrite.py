"""Link rewriting and extraction on HTML as authors and editors really write it (pure)."""

from __future__ import annotations

import random
from html.parser import HTMLParser

import pytest

from mailkit.tracking.rewrite import extract_links, is_trackable_url, rewrite_links

PIXEL = '<img src="https://t.example.jp/o/x.gif">'


def tracked(url: str) -> str:
    return "https://t.example.jp/c/" + str(len(url))


def test_http_links_are_rewritten_and_everything_else_is_byte_identical() -> None:
    html = (
        "<html><body><p>こんにちは</p>\n"
        '<a href="https://shop.example.jp/a?x=1&amp;y=2" class=btn>A</a>\n'
        "<a href='http://shop.example.jp/b'>B</a>\n"
        "<a href=https://shop.example.jp/c>C</a>\n"
        '<a href="mailto:info@shop.example.jp">mail</a>\n'
        '<a href="tel:0312345678">tel</a> <a href="/relative">rel</a> <a href="#top">top</a>\n'
        '<a href="javascript:alert(1)">js</a> <a name="anchor">no href</a>\n'
        "</body></html>"
    )
    seen: list[str] = []

    def record(url: str) -> str:
        seen.append(url)
        return tracked(url)

    out = rewrite_links(html, record)
    assert seen == [
        "https://shop.example.jp/a?x=1&y=2",  # the URL a browser opens: entities decoded
        "http://shop.example.jp/b",
        "https://shop.example.jp/c",
    ]
    assert '<a href="https://t.example.jp/c/33" class="btn">A</a>' in out
    assert '<a href="https://t.example.jp/c/24">B</a>' in out
    # Only the three tags changed; the rest of the document is untouched.
    for untouched in html.splitlines()[4:]:
        assert untouched in out
    assert out.startswith("<html><body><p>こんにちは</p>\n")


def test_notrack_links_keep_their_href_and_lose_the_marker() -> None:
    html = (
        '<a data-notrack href="https://x.example.jp/a">a</a>'
        '<a href="https://x.example.jp/b" DATA-NOTRACK="yes" title="t">b</a>'
    )
    out = rewrite_links(html, tracked)
    assert (
        out
        == '<a href="https://x.example.jp/a">a</a><a href="https://x.example.jp/b" title="t">b</a>'
    )
    assert extract_links(html) == []


def test_the_pixel_goes_before_the_last_body_end_or_at_the_end() -> None:
    assert rewrite_links("<html><BODY>x</Body ></html>", tracked, pixel_html=PIXEL) == (
        f"<html><BODY>x{PIXEL}</Body ></html>"
    )
    assert rewrite_links("<p>fragment</p>", tracked, pixel_html=PIXEL) == f"<p>fragment</p>{PIXEL}"
    commented = "<body>x<!-- </body> --></body>"
    assert rewrite_links(commented, tracked, pixel_html=PIXEL) == (
        f"<body>x<!-- </body> -->{PIXEL}</body>"
    )


@pytest.mark.parametrize(
    "html",
    [
        '<!-- <a href="https://hidden.example.jp/">old</a> -->',
        "<script>var s = \"<a href='https://hidden.example.jp/'>\";</script>",
        '<style>/* <a href="https://hidden.example.jp/"> */</style>',
        '<title><a href="https://hidden.example.jp/"></title>',
        '<img alt="<a href=https://hidden.example.jp/>">',
        "<img alt='x' title=\"<a href='https://hidden.example.jp/'>\">",
        '<abbr title="https://hidden.example.jp/">abbr is not a</abbr>',
        '<area href="https://hidden.example.jp/">',
        '<a href="https://hidden.example.jp/"',  # never closed: text, not a tag
        '<a title="x>" href="https://hidden.example.jp/ spaced">',  # whitespace in the URL
        '<a href="https:\\\\hidden.example.jp/">',  # backslashes: browsers read "//"
        '<a href="https:///nohost">',
        '<a href="https://bad.example.jp:99999/">',
        '<a href=" javascript:alert(1)">',
    ],
)
def test_links_that_are_not_links_or_not_safe_are_left_alone(html: str) -> None:
    assert extract_links(html) == []
    assert rewrite_links(html, tracked) == html


def test_odd_but_valid_markup() -> None:
    html = (
        '<A HREF="https://x.example.jp/upper">u</A>'
        '<a\nhref\n=\n"https://x.example.jp/newlines"\n>n</a>'
        '<a href="https://x.example.jp/first" href="https://evil.example/second">d</a>'
        '<a href="https://x.example.jp/self" />'
        '<a title=\'say "hi"\' href="https://x.example.jp/q">q</a>'
        '<a href="  https://x.example.jp/padded  ">p</a>'
        '<a href="https://例え.jp/パス">idn</a>'
    )
    assert extract_links(html) == [
        "https://x.example.jp/upper",
        "https://x.example.jp/newlines",
        "https://x.example.jp/first",
        "https://x.example.jp/self",
        "https://x.example.jp/q",
        "https://x.example.jp/padded",
        "https://例え.jp/パス",
    ]
    out = rewrite_links(html, lambda url: "https://t/c/1")
    assert "evil.example" not in out  # the ignored second href is dropped, not kept
    assert '<a href="https://t/c/1" />' in out
    assert '<a title="say &quot;hi&quot;" href="https://t/c/1">q</a>' in out
    assert out.count("https://t/c/1") == 7


def test_returning_none_leaves_a_link_alone() -> None:
    html = '<a href="https://x.example.jp/a">a</a>'
    assert rewrite_links(html, lambda url: None) == html


def test_trackable_urls() -> None:
    assert is_trackable_url("https://shop.example.jp/a?b=1#c")
    assert is_trackable_url("http://127.0.0.1:8080/")
    for bad in [
        "//evil.example",
        "javascript:alert(1)",
        "ftp://x",
        "https://",
        "https://a b",
        "data:x",
    ]:
        assert not is_trackable_url(bad), bad


class _Reference(HTMLParser):
    """The standard library's reading of the same documents, for comparison."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.links: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag != "a" or any(name == "data-notrack" for name, _ in attrs):
            return
        href = next((value for name, value in attrs if name == "href"), None)
        if href is not None and is_trackable_url(href.strip()):
            self.links.append(href.strip())

    handle_startendtag = handle_starttag


PIECES = [
    "text ",
    "日本語のテキスト",
    "<p>",
    "</p>",
    "<br/>",
    '<a href="https://a.example.jp/1">',
    "<a href='https://a.example.jp/2?x=1&amp;y=2'>",
    "<a href=https://a.example.jp/3>",
    '<a class="c" href="https://a.example.jp/4" data-notrack>',
    '<a href="mailto:x@example.jp">',
    "</a>",
    '<img src="https://a.example.jp/i.png" alt="<a href=https://no.example/>">',
    '<!-- <a href="https://no.example/c"> -->',
    "<script>if (a < b) { x = \"<a href='https://no.example/s'>\"; }</script>",
    '<style>a[href^="https://no.example/"] { color: red }</style>',
    "<table><tr><td>",
    "</td></tr></table>",
    "a < b and c > d ",
    "&amp; &lt;a href=&quot;https://no.example/e&quot;&gt; ",
    '<div title="x > y">',
    "</div>",
]


def test_agrees_with_the_standard_library_parser_on_generated_documents() -> None:
    rng = random.Random(20260401)
    for _ in range(400):
        html = "".join(rng.choice(PIECES) for _ in range(rng.randint(1, 30)))
        reference = _Reference()
        reference.feed(html)
        reference.close()
        assert extract_links(html) == reference.links, html
        out = rewrite_links(html, lambda url: "https://t/c/x")
        assert out.count("https://t/c/x") == len(reference.links), html
        assert out.count("no.example") == html.count("no.example"), html
