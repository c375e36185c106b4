"""A linear-time HTML tokenizer for the two readers of a message's HTML: the plain-text alternative
(`pipeline.compose.html_to_text`) and click and open tracking (`pipeline.tracking.html`).

The standard library's `html.parser` takes quadratic time on some malformed markup: 40 KB of `<a '` took 8 s
of one process's CPU, and a 1 MB `/v1/send` body hours, while every other client of that process waited; `<![`
followed by no name raised an AssertionError. Here every token is found by one regular expression whose every
branch stops at the next `<` (a quoted attribute value may hold `>`, as in HTML, but not `<`), so no position
is scanned twice, and nothing raises.

It reads well-formed markup as `html.parser` does (tests/test_html_tokens.py compares them): tags and their
names (lower-cased), attributes as its `attrfind_tolerant` reads them, comments, declarations and processing
instructions skipped, the content of `<script>` and `<style>` taken as raw text up to their end tag. Malformed
markup is read as the HTML standard's tokenizer would, roughly: a `<` that starts no tag is text, a `<!` or
`<?` runs to the next `>` (a bogus comment), an unclosed comment to the end.
"""

from __future__ import annotations

import html
import re
from collections.abc import Iterator

_ATTRIBUTES = r"""(?:[^<>"']++|"[^"<]*+"|'[^'<]*+')*+"""
_PARSED_ATTRIBUTES = r"""(?:\s|/(?!>))*+
    (?:(?<=['"\s/])[^\s/><][^\s/=><]*+(?:\s*+=++\s*+(?:'[^'<]*+'|"[^"<]*+"|(?!['"])[^>\s<]*+))?+(?:\s|/(?!>))*+)*+
    \s*+"""
"""A start tag's attributes read one by one as `html.parser` reads them (its `attrfind_tolerant`, without `<` in a
value): a slash before the `>` that follows is the tag's own (`<script/>`), one inside an unquoted value is not
(`<script src=/>`). Possessive throughout: each position is read once."""
TOKEN = re.compile(rf"""
    <(?P<raw_name>script|style)(?=[\t\n\r\f />])(?P<raw_attributes>{_PARSED_ATTRIBUTES})>
        (?P<raw>.*?)(?:</\s*(?P=raw_name)\s*>|\Z)
  | <(?P<closing>/?)(?P<name>[a-zA-Z][^\t\n\r\f />\x00<]*+)(?P<attributes>{_ATTRIBUTES})>
  | <!--.*?(?:--!?>|\Z)
  | <[!?][^>]*+>?
  | (?P<text>[^<]++|<)
""", re.VERBOSE | re.DOTALL | re.IGNORECASE)
"""One token of HTML, found in order by `TOKEN.finditer(markup)`; whichever group is set says what it is:
- `text`: text, character references not yet decoded;
- `raw_name`: a `<script>` or `<style>` element, start tag (`raw_attributes`), content (`raw`, tags and all, as
  `html.parser` reads it) and end tag, to the end of the markup if it has none;
- `name`: a start tag (`closing` empty) or an end tag (`closing` is `/`), with what it holds after its name
  (`attributes`, as written: a self-closing tag's ends with `/`);
- none of them: a comment, a declaration or a processing instruction."""
_ATTRIBUTE = re.compile(r"""((?<=['"\s/])[^\s/>][^\s/=>]*)(\s*=+\s*('[^']*'|"[^"]*"|(?!['"])[^>\s]*))?(?:\s|/(?!>))*""")
"""An attribute of a start tag, as `html.parser` reads it (its `attrfind_tolerant`): name, `=value`, value."""
_LEADING_SPACE = re.compile(r"(?:\s|/(?!>))*")
_LONG_NUMERIC_REFERENCE = re.compile(r"&#(?:([xX])([0-9a-fA-F]{7,})|([0-9]{8,}))")
"""A numeric character reference of more digits than any code point has (leading zeros count): `html.unescape`
raises ValueError past Python's 4,300-digit limit on reading an integer."""


def unescape(text: str) -> str:
    """`html.unescape(text)`, also for a reference of thousands of digits (decoded as `html.unescape` decodes
    any number past U+10FFFF: U+FFFD)."""
    if "&#" in text:
        text = _LONG_NUMERIC_REFERENCE.sub(_shortened_reference, text)
    return html.unescape(text)


def _shortened_reference(match: re.Match[str]) -> str:
    hexadecimal, digits = (match.group(1), match.group(2)) if match.group(1) else ("", match.group(3))
    significant = digits.lstrip("0") or "0"
    if len(significant) > (6 if hexadecimal else 7):
        significant = "110000" if hexadecimal else "1114112"  # U+110000, one past the last code point
    return f"&#{hexadecimal}{significant}"


def attribute_matches(token: re.Match[str]) -> Iterator[re.Match[str]]:
    """The attributes of a start tag found by `TOKEN`, as `html.parser` reads them: in each, group 1 is the name,
    group 3 the value as written (quotes and all; None for an attribute without one), at their offsets in the
    markup. They are read with the tag's `>` in view, as `html.parser` reads them: a slash just before it is the
    tag's own, not a separator between attributes (`self_closing`)."""
    markup, group = token.string, "raw_attributes" if token.group("raw_name") is not None else "attributes"
    end = token.end(group)
    position = _LEADING_SPACE.match(markup, token.start(group), end + 1).end()  # type: ignore[union-attr]
    while position < end:
        match = _ATTRIBUTE.match(markup, position, end + 1)
        if match is None or match.end() == position:
            return
        yield match
        position = match.end()


def self_closing(token: re.Match[str]) -> bool:
    """Whether a start tag found by `TOKEN` ends with a slash of its own (`<br/>`, `<a href="x" />`), as
    `html.parser` reads it: a slash that ends an unquoted value (`<a href=/>`) is the value's, and the tag opens an
    element."""
    markup, group = token.string, "raw_attributes" if token.group("raw_name") is not None else "attributes"
    start, end = token.span(group)
    if not markup[start:end].endswith("/"):
        return False
    position = _LEADING_SPACE.match(markup, start, end + 1).end()  # type: ignore[union-attr]
    for match in attribute_matches(token):
        position = match.end()
    return markup[position:end].strip() == "/"


def attributes(token: re.Match[str]) -> list[tuple[str, str | None]]:
    """A start tag's attributes as `html.parser` hands them over: names lower-cased, values unquoted and with
    their character references decoded, None for an attribute without a value."""
    found: list[tuple[str, str | None]] = []
    for match in attribute_matches(token):
        value = match.group(3)
        if value is not None:
            value = unquoted(value)
        found.append((match.group(1).lower(), unescape(value) if value else value))
    return found


def unquoted(value: str) -> str:
    """An attribute's value as written (group 3 of an `attribute_matches` match) without its quotes."""
    return value[1:-1] if value[:1] in ("'", '"') and value[:1] == value[-1:] else value
