"""Tracking in an HTML document: the open pixel before `</body>`, and each link's `href` replaced by its click
redirect. Only the bytes of those `href` values and the pixel change; every other character stays as
written (no re-serialisation), so a message looks exactly as its author made it.

Links are found with `pipeline.html_tokens` (read as the standard library's tokenizer reads HTML, in linear
time), so an `<a>` inside a comment, a `<script>` or a `<style>` is left alone (Outlook's conditional comments
included). Which links are rewritten is the caller's choice (`click_url` answers None to keep one as written).
"""

from __future__ import annotations

import html
import re
from collections.abc import Callable

from pipeline import html_tokens

LINK_TAGS = ("a", "area")
_PIXEL = ('<img src="{src}" width="1" height="1" alt="" '
          'style="display:block;width:1px;height:1px;border:0;margin:0;padding:0">')


def _href_span(tag: re.Match[str]) -> tuple[int, int, str] | None:
    """Where the first `href` value of a start tag is in the markup (quotes included), and its raw text."""
    for attribute in html_tokens.attribute_matches(tag):
        if attribute.group(1).lower() == "href" and attribute.group(3) is not None:
            return attribute.start(3), attribute.end(3), html_tokens.unquoted(attribute.group(3))
    return None


def track_html(markup: str, open_url: str | None, click_url: Callable[[str], str | None] | None) -> str:
    """`markup` with the pixel loading `open_url` (if given) and each link whose `click_url(target)` is not
    None pointing there instead."""
    links: list[re.Match[str]] = []
    body_end = html_end = None
    for token in html_tokens.TOKEN.finditer(markup):
        name = token.group("name")
        if name is None:
            continue
        name, closing = name.lower(), bool(token.group("closing"))
        if not closing and name in LINK_TAGS:
            links.append(token)
        elif closing and name == "body":
            body_end = token.start()
        elif closing and name == "html":
            html_end = token.start()
    edits: list[tuple[int, int, str]] = []
    if click_url is not None:
        for tag in links:
            span = _href_span(tag)
            if span is None:
                continue
            start, end, raw_value = span
            redirect = click_url(html_tokens.unescape(raw_value))
            if redirect is not None:
                edits.append((start, end, f'"{html.escape(redirect, quote=True)}"'))
    if open_url is not None:
        at = body_end if body_end is not None else html_end
        at = len(markup) if at is None else at
        edits.append((at, at, _PIXEL.format(src=html.escape(open_url, quote=True))))
    pieces, done = [], 0
    for start, end, replacement in sorted(edits):
        pieces += [markup[done:start], replacement]
        done = end
    return "".join([*pieces, markup[done:]])
