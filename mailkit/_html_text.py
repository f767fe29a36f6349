"""HTML to plain text for the text part: readable paragraphs, lists and links as "text (url)".

Kept apart from :mod:`mailkit.templates` because it is a self-contained converter on the
stdlib ``html.parser``. Line breaks between two CJK characters vanish, as a browser shows them.
"""

from __future__ import annotations

import re
import unicodedata
from html.parser import HTMLParser
from typing import Any, Final

__all__ = ["html_to_text"]


_SKIP_TAGS: Final = frozenset({"head", "style", "script", "template", "title"})
_VOID_TAGS: Final = frozenset(
    {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "wbr"}
)
# Newlines a block asks for around itself: 2 leaves a blank line, 1 starts a new line.
_BLOCK_GAP: Final = {
    **dict.fromkeys(("p", "h1", "h2", "h3", "h4", "h5", "h6", "ul", "ol", "dl"), 2),
    **dict.fromkeys(("blockquote", "pre", "hr", "table", "figure", "address"), 2),
    **dict.fromkeys(("div", "li", "tr", "dt", "dd", "section", "article", "header"), 1),
    **dict.fromkeys(("footer", "main", "nav", "aside", "center", "form", "figcaption"), 1),
    **dict.fromkeys(("caption", "tbody", "thead", "tfoot", "body", "html"), 1),
}
_COLLAPSIBLE: Final = re.compile(r"[ \t\n\r\f]+")
_BLANK_RUNS: Final = re.compile(r"\n{3,}")
_HIDDEN_STYLE: Final = re.compile(r"display\s*:\s*none", re.IGNORECASE)


def _is_wide(char: str) -> bool:
    return unicodedata.east_asian_width(char) in ("W", "F")


def _collapse(text: str) -> str:
    """Collapse HTML whitespace; a line break between two CJK characters vanishes."""

    def repl(match: re.Match[str]) -> str:
        start, end = match.span()
        if (
            "\n" in match.group()
            and start > 0
            and end < len(text)
            and _is_wide(text[start - 1])
            and _is_wide(text[end])
        ):
            return ""
        return " "

    return _COLLAPSIBLE.sub(repl, text).replace("\xa0", " ")


class _TextExtractor(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.out: list[str] = []
        self._inline: list[str] = []
        self._pending = 0  # newlines owed before the next text
        self._hide: tuple[str, int] | None = None  # (tag, nesting depth) being skipped
        self._links: list[tuple[str, list[str]]] = []
        self._lists: list[list[Any]] = []  # [kind, next number]
        self._marker = ""  # list marker waiting for the item's first text
        self._quote = 0
        self._pre = 0

    # output
    def _prefix(self, first: bool) -> str:
        depth = len(self._lists)
        indent = "  " * max(depth - 1, 0)
        if first and self._marker:
            indent += self._marker
        elif depth:
            indent += "   " if self._lists[-1][0] == "ol" else "  "
        return "> " * self._quote + indent

    def _write_line(self, line: str) -> None:
        if self.out:
            self.out.append("\n" * max(self._pending, 1))
        self.out.append(self._prefix(first=True) + line)
        self._marker = ""
        self._pending = 0

    def _flush(self) -> None:
        raw = "".join(self._inline)
        self._inline = []
        if not raw:
            return
        if self._pre:
            lines = raw.split("\n")
        else:
            collapsed = _collapse(raw).strip()
            lines = [collapsed] if collapsed else []
        for i, line in enumerate(lines):
            if i and self.out:
                self.out.append("\n" + self._prefix(first=False) + line)
            else:
                self._write_line(line)

    def _gap(self, newlines: int) -> None:
        self._flush()
        self._pending = max(self._pending, newlines)

    # parser callbacks
    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if self._hide is not None:
            if self._hide[0] == "head" and tag == "body":
                self._hide = None  # a <head> that was never closed
            else:
                if tag == self._hide[0]:
                    self._hide = (tag, self._hide[1] + 1)
                return
        attr = dict(attrs)
        if tag in _SKIP_TAGS or _HIDDEN_STYLE.search(attr.get("style") or ""):
            if tag not in _VOID_TAGS:
                self._hide = (tag, 1)
            return
        if tag in ("ul", "ol"):
            self._gap(1 if self._lists else 2)  # a nested list hugs its item
            self._lists.append([tag, 1])
            return
        if tag in _BLOCK_GAP:
            self._gap(_BLOCK_GAP[tag])
        if tag == "br":
            self._flush()
            self._pending += 1
        elif tag == "hr":
            self._write_line("-" * 20)
            self._pending = 2
        elif tag == "li" and self._lists:
            kind = self._lists[-1]
            self._marker = f"{kind[1]}. " if kind[0] == "ol" else "- "
            kind[1] += 1
        elif tag == "blockquote":
            self._quote += 1
        elif tag == "pre":
            self._pre += 1
        elif tag == "a":
            self._links.append((attr.get("href") or "", []))
        elif tag == "img":
            alt = (attr.get("alt") or "").strip()
            if alt:
                self.handle_data(f"[{alt}]")
        elif tag in ("td", "th"):
            self._inline.append(" ")

    def handle_endtag(self, tag: str) -> None:
        if self._hide is not None:
            if tag == self._hide[0]:
                depth = self._hide[1] - 1
                self._hide = None if depth == 0 else (tag, depth)
            return
        if tag == "a" and self._links:
            href, parts = self._links.pop()
            label = _collapse("".join(parts)).strip()
            suffix = _link_suffix(href, label)
            if label and self.out and not "".join(self._inline).strip():
                self.out[-1] += suffix  # the label was a block (a button): keep the URL by it
            else:
                self._inline.append(suffix)
        elif tag in ("td", "th"):
            self._inline.append(" ")
        elif tag in ("ul", "ol") and self._lists:
            self._lists.pop()
            self._gap(1 if self._lists else 2)
            return
        if tag in _BLOCK_GAP:
            self._gap(_BLOCK_GAP[tag])
        if tag == "li":
            self._marker = ""
        elif tag == "blockquote" and self._quote:
            self._quote -= 1
        elif tag == "pre" and self._pre:
            self._pre -= 1

    def handle_data(self, data: str) -> None:
        if self._hide is not None:
            return
        self._inline.append(data)
        for _href, parts in self._links:
            parts.append(data)

    def close(self) -> None:
        super().close()
        self._flush()


def _link_suffix(href: str, text: str) -> str:
    href = href.strip()
    if not href or href.startswith(("#", "javascript:")):
        return ""
    shown = href.removeprefix("mailto:").removeprefix("tel:")
    if not text:
        return " " + shown
    if text.rstrip("/") in (href.rstrip("/"), shown.rstrip("/")):
        return ""
    return f" ({shown})"


def html_to_text(html: str) -> str:
    """A readable plain-text version of an HTML email.

    Links become ``text (url)``, paragraphs are separated by a blank line, ``<br>`` starts a
    new line, list items get ``-`` or ``1.`` markers, images their ``[alt]`` text;
    ``<head>``, ``<style>``, ``<script>`` and elements hidden with ``display:none`` (preheaders)
    are dropped.
    """
    parser = _TextExtractor()
    parser.feed(html)
    parser.close()
    return _tidy_text("".join(parser.out))


def _tidy_text(text: str) -> str:
    lines = [line.rstrip() for line in text.split("\n")]
    text = _BLANK_RUNS.sub("\n\n", "\n".join(lines)).strip("\n")
    return text + "\n" if text else ""
