"""Tracking in an HTML document: the open pixel before `</body>`, and each link's `href` replaced by its click
redirect. Only the bytes of those `href` values and the pixel change; every other character stays as
written (no re-serialisation), so a message looks exactly as its author made it.

Links are found with the standard library's HTML tokenizer, so an `<a>` inside a comment, a `<script>` or a
`<style>` is left alone (Outlook's conditional comments included). Which links are rewritten is the caller's
choice (`click_url` answers None to keep one as written).
"""

from __future__ import annotations

import html
import re
from collections.abc import Callable
from html.parser import HTMLParser

LINK_TAGS = ("a", "area")
_TAG_NAME = re.compile(r"<[a-zA-Z][^\t\n\r\f />\x00]*(?:\s|/(?!>))*")
_ATTRIBUTE = re.compile(r"""((?<=['"\s/])[^\s/>][^\s/=>]*)(\s*=+\s*('[^']*'|"[^"]*"|(?!['"])[^>\s]*))?(?:\s|/(?!>))*""")
"""An attribute of a start tag, as `html.parser` reads it (its `attrfind_tolerant`): name, `=value`, value."""
_PIXEL = ('<img src="{src}" width="1" height="1" alt="" '
          'style="display:block;width:1px;height:1px;border:0;margin:0;padding:0">')


class UnreadableHtml(Exception):
    """The tokenizer failed on the markup: it is sent as written."""


class _LinkFinder(HTMLParser):
    """The offsets of every link start tag and of the last `</body>` and `</html>` end tags."""

    def __init__(self, markup: str) -> None:
        super().__init__(convert_charrefs=False)
        self._line_starts = [0, *(match.end() for match in re.finditer("\n", markup))]
        self.links: list[tuple[int, str]] = []
        self.body_end: int | None = None
        self.html_end: int | None = None

    def _offset(self) -> int:
        line, column = self.getpos()
        return self._line_starts[line - 1] + column

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in LINK_TAGS:
            text = self.get_starttag_text()
            if text is not None:
                self.links.append((self._offset(), text))

    def handle_endtag(self, tag: str) -> None:
        if tag == "body":
            self.body_end = self._offset()
        elif tag == "html":
            self.html_end = self._offset()


def _href_span(tag: str) -> tuple[int, int, str] | None:
    """Where the first `href` value of a start tag is (quotes included) and its raw text."""
    name = _TAG_NAME.match(tag)
    if name is None:
        return None
    position = name.end()
    while position < len(tag):
        match = _ATTRIBUTE.match(tag, position)
        if match is None or match.end() == position:
            return None
        if match.group(1).lower() == "href" and match.group(3) is not None:
            value = match.group(3)
            if value[:1] in ("'", '"'):
                value = value[1:-1]
            return match.start(3), match.end(3), value
        position = match.end()
    return None


def track_html(markup: str, open_url: str | None, click_url: Callable[[str], str | None] | None) -> str:
    """`markup` with the pixel loading `open_url` (if given) and each link whose `click_url(target)` is not
    None pointing there instead. Raises `UnreadableHtml` when the tokenizer fails."""
    finder = _LinkFinder(markup)
    try:
        finder.feed(markup)
        finder.close()
    except Exception as exc:  # html.parser is tolerant; a failure here is a bug there, not ours to send
        raise UnreadableHtml(str(exc) or type(exc).__name__) from exc
    edits: list[tuple[int, int, str]] = []
    if click_url is not None:
        for offset, tag in finder.links:
            if markup[offset:offset + len(tag)] != tag:
                continue
            span = _href_span(tag)
            if span is None:
                continue
            start, end, raw_value = span
            redirect = click_url(html.unescape(raw_value))
            if redirect is not None:
                edits.append((offset + start, offset + end, f'"{html.escape(redirect, quote=True)}"'))
    if open_url is not None:
        at = finder.body_end if finder.body_end is not None else finder.html_end
        at = len(markup) if at is None else at
        edits.append((at, at, _PIXEL.format(src=html.escape(open_url, quote=True))))
    pieces, done = [], 0
    for start, end, replacement in sorted(edits):
        pieces += [markup[done:start], replacement]
        done = end
    return "".join([*pieces, markup[done:]])
