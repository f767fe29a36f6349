"""Finding and rewriting the links of an HTML part (pure: no I/O).

The HTML is tokenized the way a browser reads it: attribute quoting (double, single or none),
character references, comments, and the raw text of ``<script>``, ``<style>``, ``<title>`` and
the like; a link inside a comment, a script or another tag's attribute is never seen.
The output is the input with only the affected ``<a>`` start tags re-serialised, every other
byte unchanged.

A link is *trackable* when its ``href`` is an absolute ``http(s)`` URL with a host and nothing
that could split a header or a URL (controls, whitespace inside). ``mailto:``, ``tel:``,
relative and ``javascript:`` links are left exactly as they are, and so is any link carrying a
``data-notrack`` attribute (which is removed from the output: it is an instruction to us, not
markup for the reader).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from html import escape, unescape
from typing import Final
from urllib.parse import urlsplit

__all__ = ["NOTRACK_ATTRIBUTE", "extract_links", "is_trackable_url", "rewrite_links"]

#: Authors mark a link they do not want tracked with this attribute (any value, or none).
NOTRACK_ATTRIBUTE: Final = "data-notrack"

_BAD_URL_CHARS: Final = re.compile(r"[\x00-\x20\x7f\\]")
_HAS_ANCHOR: Final = re.compile(r"<a[\s/>]", re.IGNORECASE)
_HAS_BODY_END: Final = re.compile(r"</body", re.IGNORECASE)


@lru_cache(maxsize=4096)  # the same few URLs come back in every message of a campaign
def is_trackable_url(url: str) -> bool:
    """True for an absolute http(s) URL with a host and no whitespace, controls or backslash.

    A backslash is refused because browsers read ``https:\\\\evil`` like ``https://evil``;
    such a link is left as written rather than stored as a redirect target.
    """
    if _BAD_URL_CHARS.search(url):
        return False
    try:
        parts = urlsplit(url)
        host = parts.hostname
        parts.port  # noqa: B018 - raises ValueError for a malformed port
    except ValueError:
        return False
    return parts.scheme in ("http", "https") and bool(host)


@dataclass(frozen=True)
class _Anchor:
    start: int  # offset of "<a" in the document
    end: int  # offset just after its ">"
    attrs: tuple[tuple[str, str | None], ...]
    self_closing: bool


# The markup is scanned by two expressions, so that the loop in Python runs once per link, not
# once per tag. _SKIP consumes, in C, everything that is not an <a> start tag or </body>:
# text, comments, raw-text elements (whose content is never markup: <script>, <style>,
# <title>, ...), every other tag with its attributes, and a "<" that starts nothing. A "<a"
# hidden in a comment, a script or another tag's attribute value is thereby never seen.
# The attribute grammar is the HTML tokenizer's (as in html.parser): a quote opens a value
# only after "=". Quantifiers are possessive, so no input can make them backtrack.
_RAW_TEXT = ("script", "style", "title", "textarea", "xmp", "iframe", "noembed", "noframes")
_NAME_END = r"(?![^\s/>])"
_ATTRS = (
    r"""(?:[\s/]*+(?:(?<=['"\s/])[^\s/>][^\s/=>]*+"""
    r"""(?:\s*+=++\s*+(?:'[^']*+'|"[^"]*+"|(?!['"])[^>\s]*+))?+))*+[\s/]*+"""
)
_SKIP: Final = re.compile(
    r"(?:[^<]++"
    r"|<!--(?:-?>|.*?(?:--!?>|\Z))"  # a comment (also the abrupt <!--> and <!--->)
    + "".join(  # no backreference: capturing groups under *+ trip a bug of Python 3.11's re
        rf"|<{name}{_NAME_END}{_ATTRS}>.*?(?:</{name}{_NAME_END}[^>]*+>|\Z)" for name in _RAW_TEXT
    )
    + rf"|<(?!a{_NAME_END})[a-z][^\t\n\r\f />\x00]*+{_ATTRS}>"  # any other start tag
    rf"|</(?!body{_NAME_END})[a-z][^>]*+>"  # any other end tag
    r"|<(?:[!?]|/(?![a-z]))[^>]*+>"  # doctype, processing instruction, bogus comment
    r"|<(?![a-z!?/]))*+",  # a "<" that starts nothing is text
    re.DOTALL | re.IGNORECASE,
)
_WANTED: Final = re.compile(
    rf"<a{_NAME_END}(?P<attrs>{_ATTRS})>|(?P<body></body{_NAME_END}[^>]*+>)", re.IGNORECASE
)
_ATTR: Final = re.compile(
    r"""((?<=['"\s/])[^\s/>][^\s/=>]*+)(?:\s*+=++\s*+('[^']*+'|"[^"]*+"|(?!['"])[^>\s]*+))?+"""
)


def _parse_attrs(text: str) -> tuple[tuple[str, str | None], ...]:
    attrs: list[tuple[str, str | None]] = []
    for match in _ATTR.finditer(" " + text):
        name, value = match.group(1).lower(), match.group(2)
        if value is not None:
            if value[:1] in ("'", '"') and value[-1:] == value[:1] and len(value) > 1:
                value = value[1:-1]
            value = unescape(value)
        attrs.append((name, value))
    return tuple(attrs)


@dataclass(frozen=True)
class _Scan:
    anchors: list[_Anchor]
    body_end: int | None


def _scan(html: str) -> _Scan:
    """The ``<a>`` start tags of ``html`` with their offsets, and where the last </body> is."""
    anchors: list[_Anchor] = []
    body_end: int | None = None
    skip, wanted = _SKIP.match, _WANTED.match
    pos, size = 0, len(html)
    while True:
        pos = skip(html, pos).end()  # type: ignore[union-attr]  # matches, perhaps empty
        if pos >= size:
            break
        match = wanted(html, pos)
        if match is None:  # an unterminated tag: its "<" is text
            pos += 1
            continue
        attrs = match.group("attrs")
        if attrs is None:
            body_end = pos
        else:
            self_closing = attrs.rstrip().endswith("/")
            anchors.append(_Anchor(pos, match.end(), _parse_attrs(attrs), self_closing))
        pos = match.end()
    return _Scan(anchors, body_end)


def _href(attrs: tuple[tuple[str, str | None], ...]) -> str | None:
    for name, value in attrs:
        if name == "href":
            return value
    return None


def _notrack(attrs: tuple[tuple[str, str | None], ...]) -> bool:
    return any(name == NOTRACK_ATTRIBUTE for name, _ in attrs)


def extract_links(html: str) -> list[str]:
    """The trackable URLs of ``html``'s ``<a href>`` links, in document order (with repeats).

    Links marked ``data-notrack`` and hrefs that are not absolute http(s) URLs are skipped.
    Character references are decoded (``&amp;`` → ``&``), so these are the URLs a browser
    would open.
    """
    if not _HAS_ANCHOR.search(html):
        return []
    urls = []
    for anchor in _scan(html).anchors:
        href = _href(anchor.attrs)
        if href is None or _notrack(anchor.attrs):
            continue
        url = href.strip()
        if is_trackable_url(url):
            urls.append(url)
    return urls


def _serialise(anchor: _Anchor, new_href: str | None) -> str:
    parts = ["<a"]
    seen_href = False
    for name, value in anchor.attrs:
        if name == NOTRACK_ATTRIBUTE:
            continue
        if name == "href":
            if seen_href:
                continue  # browsers use the first href; a second one is dropped
            seen_href = True
            if new_href is not None:
                value = new_href
        parts.append(f" {name}" if value is None else f' {name}="{escape(value, quote=True)}"')
    parts.append(" />" if anchor.self_closing else ">")
    return "".join(parts)


def rewrite_links(
    html: str,
    tracked_url: Callable[[str], str | None],
    *,
    pixel_html: str | None = None,
) -> str:
    """``html`` with each trackable link's href replaced by ``tracked_url(url)``.

    ``tracked_url`` gets the decoded URL of every trackable link and returns the replacement
    (or None to leave that link alone). Tags marked ``data-notrack`` keep their href and lose
    the marker. ``pixel_html`` is inserted just before the last ``</body>``, or appended when
    the document has none.
    """
    if not _HAS_ANCHOR.search(html) and NOTRACK_ATTRIBUTE not in html:
        if not pixel_html:
            return html
        if not _HAS_BODY_END.search(html):
            return html + pixel_html
    scanner = _scan(html)
    # Edits are (start, end, text), applied left to right; the pixel is a zero-width one.
    edits: list[tuple[int, int, str]] = []
    for anchor in scanner.anchors:
        href = _href(anchor.attrs)
        notrack = _notrack(anchor.attrs)
        replacement: str | None = None
        if href is not None and not notrack:
            url = href.strip()
            if is_trackable_url(url):
                replacement = tracked_url(url)
        if replacement is not None or notrack:
            edits.append((anchor.start, anchor.end, _serialise(anchor, replacement)))
    if pixel_html:
        at = len(html) if scanner.body_end is None else scanner.body_end
        edits.append((at, at, pixel_html))
        edits.sort(key=lambda edit: edit[0])
    out: list[str] = []
    cursor = 0
    for start, end, text in edits:
        out += [html[cursor:start], text]
        cursor = end
    out.append(html[cursor:])
    return "".join(out)
