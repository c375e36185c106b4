"""The HTML readers (the plain-text alternative and click/open tracking) in linear time: they read well-formed
HTML exactly as the standard library's `html.parser` did (the oracle below, the code as it was), and hostile
markup that took `html.parser` quadratic time (40 KB of `<a '`: 8 s of CPU; the 1 MB a send may carry:
hours, the process's event loop stalled) or made it raise (`<![`) is read at once.

The end-to-end tests send through the real app and database and deliver to a folder (FileTransport).
"""

from __future__ import annotations

import asyncio
import html
import re
import time
from collections.abc import Callable
from html.parser import HTMLParser

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from api.context import TRACKING
from pipeline.compose import html_to_text
from pipeline.tracking.html import track_html
from tests.test_delivery import dispatch_all
from tests.test_render_limits import cpu_time
from tests.test_tracking import delivered, html_of, pixels, tracking_dispatcher

# --- the oracle: html.parser, as the two readers used it ----------------------------------------------------


class _OldTextExtractor(HTMLParser):
    BLOCKS = {"p", "div", "br", "tr", "li", "h1", "h2", "h3", "h4", "h5", "h6", "table"}

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self.skip = 0
        self.href: str | None = None

    def handle_starttag(self, tag, attrs):
        if tag in ("style", "script", "head"):
            self.skip += 1
        elif tag in self.BLOCKS:
            self.parts.append("\n")
        elif tag == "a":
            self.href = dict(attrs).get("href")

    def handle_endtag(self, tag):
        if tag in ("style", "script", "head"):
            self.skip = max(0, self.skip - 1)
        elif tag in self.BLOCKS:
            self.parts.append("\n")
        elif tag == "a" and self.href:
            self.parts.append(f" ({self.href})")
            self.href = None

    def handle_data(self, data):
        if not self.skip:
            self.parts.append(data)


def old_html_to_text(markup: str) -> str:
    parser = _OldTextExtractor()
    parser.feed(markup)
    parser.close()
    lines = [re.sub(r"[ \t]+", " ", line).strip() for line in "".join(parser.parts).splitlines()]
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip() + "\n"


_TAG_NAME = re.compile(r"<[a-zA-Z][^\t\n\r\f />\x00]*(?:\s|/(?!>))*")
_ATTRIBUTE = re.compile(r"""((?<=['"\s/])[^\s/>][^\s/=>]*)(\s*=+\s*('[^']*'|"[^"]*"|(?!['"])[^>\s]*))?(?:\s|/(?!>))*""")


class _OldLinkFinder(HTMLParser):
    def __init__(self, markup: str) -> None:
        super().__init__(convert_charrefs=False)
        self._line_starts = [0, *(match.end() for match in re.finditer("\n", markup))]
        self.links: list[tuple[int, str]] = []
        self.body_end: int | None = None
        self.html_end: int | None = None

    def _offset(self) -> int:
        line, column = self.getpos()
        return self._line_starts[line - 1] + column

    def handle_starttag(self, tag, attrs):
        if tag in ("a", "area"):
            self.links.append((self._offset(), self.get_starttag_text()))

    def handle_endtag(self, tag):
        if tag == "body":
            self.body_end = self._offset()
        elif tag == "html":
            self.html_end = self._offset()


def _old_href_span(tag: str):
    position = _TAG_NAME.match(tag).end()
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


def old_track_html(markup: str, open_url: str | None, click_url: Callable[[str], str | None] | None) -> str:
    finder = _OldLinkFinder(markup)
    finder.feed(markup)
    finder.close()
    edits = []
    if click_url is not None:
        for offset, tag in finder.links:
            span = _old_href_span(tag)
            if span is not None and (redirect := click_url(html.unescape(span[2]))) is not None:
                edits.append((offset + span[0], offset + span[1], f'"{html.escape(redirect, quote=True)}"'))
    if open_url is not None:
        at = finder.body_end if finder.body_end is not None else finder.html_end
        at = len(markup) if at is None else at
        edits.append((at, at, f'<img src="{open_url}">'))
    pieces, done = [], 0
    for start, end, replacement in sorted(edits):
        pieces += [markup[done:start], replacement]
        done = end
    return "".join([*pieces, markup[done:]])


# --- well-formed HTML ------------------------------------------------------------------------------------------

_ENTITIES = st.sampled_from(["&amp;", "&lt;", "&gt;", "&quot;", "&#39;", "&nbsp;", "&eacute;", "&#x41;", "&#169;",
                             " & ", "R&D "])
_WORDS = st.text(st.characters(blacklist_characters="<&\x00", blacklist_categories=("Cs",)), max_size=12)
_TEXT = st.lists(st.one_of(_WORDS, _ENTITIES, st.sampled_from([" ", "\n", "\t", "  "])), max_size=6).map("".join)
_VALUE = st.lists(st.one_of(st.text(st.characters(blacklist_characters="<\"'&\x00", blacklist_categories=("Cs",)),
                                    max_size=10), _ENTITIES, st.just(">")), max_size=4).map("".join)
_UNQUOTED = st.from_regex(r"[A-Za-z0-9:/._?#-]{1,12}", fullmatch=True)


@st.composite
def _attribute(draw) -> str:
    name = draw(st.sampled_from(["href", "HREF", "title", "class", "style", "id", "target"]))
    form = draw(st.sampled_from(["double", "single", "bare", "none"]))
    if form == "none":
        return f" {name}"
    if form == "bare":
        return f" {name}={draw(_UNQUOTED)}"
    value = draw(_VALUE).replace("'" if form == "single" else '"', "")
    quote = "'" if form == "single" else '"'
    return f" {name}={quote}{value}{quote}"


_CONTAINERS = ["p", "div", "a", "b", "span", "h1", "h3", "li", "ul", "table", "tr", "td", "head", "title", "body",
               "html", "A", "Div"]
_VOIDS = ["br", "area", "img", "hr", "BR"]


def _element(children) -> st.SearchStrategy[str]:
    @st.composite
    def build(draw) -> str:
        kind = draw(st.sampled_from(["container", "container", "void", "raw", "comment", "text"]))
        if kind == "text":
            return draw(_TEXT)
        if kind == "comment":
            return f"<!--{draw(_WORDS).replace('-', '')}-->"
        attributes = "".join(draw(st.lists(_attribute(), max_size=3)))
        if kind == "void":
            return f"<{draw(st.sampled_from(_VOIDS))}{attributes}{draw(st.sampled_from(['', '/', ' /']))}>"
        if kind == "raw":
            name = draw(st.sampled_from(["script", "style", "SCRIPT"]))
            content = draw(st.text(st.characters(blacklist_characters="/\x00", blacklist_categories=("Cs",)),
                                   max_size=20))
            return f"<{name}{attributes}>{content}</{name.lower()}>"
        name = draw(st.sampled_from(_CONTAINERS))
        return f"<{name}{attributes}>{''.join(draw(st.lists(children, max_size=4)))}</{name}>"
    return build()


WELL_FORMED = st.recursive(_TEXT, _element, max_leaves=20).map(lambda body: f"<!DOCTYPE html>{body}")


def _redirect(url: str) -> str | None:
    return None if url.startswith("mailto") else "https://t.example/c/" + url[::-1]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(WELL_FORMED)
@example("<!DOCTYPE html><script href=/>0</script>")
@example('<!DOCTYPE html><a href=/><b class=x/>Home</b></a><style id=/ title="/">a{}</style>')
def test_well_formed_html_reads_as_html_parser_read_it(markup):
    assert html_to_text(markup) == old_html_to_text(markup)
    pixel = "https://t.example/o/1"
    expected = old_track_html(markup, pixel, _redirect).replace(f'<img src="{pixel}">', "PIXEL")
    tracked = track_html(markup, pixel, _redirect)
    assert re.sub(r'<img src="https://t\.example/o/1"[^>]*>', "PIXEL", tracked) == expected


@pytest.mark.parametrize(("markup", "text"), [
    ('<p>Hi &amp; <a href="https://x.example/?a=1&amp;b=2">there</a></p><p>Bye</p>',
     "Hi & there (https://x.example/?a=1&b=2)\n\nBye\n"),
    ('<head><title>T</title><style>p{}</style></head><script>if (a<b) x("<p>")</script><b>text</b>', "text\n"),
    ('<a title="1 > 0" href=\'/x\'>link</a><br/>line', "link (/x)\n\nline\n"),
    ("<!--[if mso]><p>outlook</p><![endif]--><p>all</p>", "all\n"),
    # A slash that ends an unquoted value is the value's: the tag opens its element (a script's or a style's
    # content stays out; a link's target follows its text). Found by the differential test below.
    ("<!DOCTYPE html><script href=/>0</script><style a= />p{}</style>", "\n"),
    ("<a href=/>Home</a> <a href=x / >Away</a>", "Home (/) Away (x)\n"),
    # and one after a quoted value, an attribute without a value or the name is the tag's own
    ('<script a />x</script><script/>y</script><a href="z"/>b</a><br/>c', "xy (z)b\n\nc\n"),
])
def test_the_text_alternative_of_examples(markup, text):
    assert html_to_text(markup) == text == old_html_to_text(markup)


def test_links_in_comments_scripts_and_styles_are_left_alone():
    markup = ('<html><body><!-- <a href="/c">c</a> --><script>"<a href=/s>"</script><style>a{}</style>'
              '<a href="/x">x</a><AREA HREF=/y></body></html>')
    tracked = track_html(markup, "https://o", lambda url: "https://r" + url)
    assert re.findall(r'href="([^"]*)"', tracked, re.I) == ["/c", "https://r/x", "https://r/y"]
    assert "<a href=/s>" in tracked and re.search(r'<img src="https://o"[^>]*></body></html>$', tracked)


def test_a_reference_of_thousands_of_digits_decodes_as_any_number_past_unicode():
    """`html.unescape` (and html.parser before) raised ValueError on it: Python reads no integer of over 4,300
    digits. Past U+10FFFF a reference is U+FFFD; leading zeros are only zeros."""
    huge, padded = "&#" + "9" * 5000 + ";", "&#" + "0" * 5000 + "65;"
    assert html_to_text(f"<p>{huge} and {padded}</p>") == "\ufffd and A\n"
    markup = f'<a href="https://x.example/{huge}{padded}">x</a>'
    assert track_html(markup, None, lambda url: "https://r/" + url[-2:]) == '<a href="https://r/\ufffdA">x</a>'


# --- hostile markup ---------------------------------------------------------------------------------------------

HOSTILE_UNITS = ["<a '", "<!--", "<a<", '<a href="', "&#", "<![", "</a ", "<p", "<script>", "<style><", "<a \"'>",
                 "<!", "<a title='", "<a href=x>y</a>", "<script a=", "<script a ", "<script a='", "<script a=/",
                 "<a href=/>", "<br a/"]


@pytest.mark.parametrize("unit", HOSTILE_UNITS)
def test_a_megabyte_of_hostile_markup_is_read_in_linear_time(unit):
    """`html.parser` took 8 s for 40 KB of `<a '` (and 0.7–1.7 s for 40 KB of most others here), growing with the
    square of the size; here a whole megabyte of each takes a fraction of a second (bound: 3 s of CPU)."""
    markup = unit * (1_000_000 // len(unit))
    assert cpu_time(html_to_text, markup) < 3.0
    assert cpu_time(track_html, markup, "https://o", lambda url: "https://r") < 3.0


@settings(max_examples=300, deadline=2000)
@given(st.text(st.sampled_from("<>/!-?'\"&#=;ab \n[]"), max_size=3000))
@example("<![<![")
@example("<p>Hi <![ there</p>")
@example("<a '" * 500)
def test_any_markup_is_read_without_failing_and_left_as_written_when_nothing_is_tracked(markup):
    text = html_to_text(markup)
    assert text.endswith("\n") and "\r" not in text
    assert track_html(markup, None, None) == markup
    tracked = track_html(markup, "https://o", None)
    assert tracked.replace(
        '<img src="https://o" width="1" height="1" alt="" '
        'style="display:block;width:1px;height:1px;border:0;margin:0;padding:0">', "", 1) == markup


async def test_a_send_of_a_megabyte_of_hostile_html_answers_at_once_and_is_delivered_tracked(api, sender, tmp_path):
    """The 1 MB body stalled the API process for hours (its event loop: `/health` waited too); `<![` and a
    reference of 5,000 digits made html.parser raise (a 500). All are answered at once and delivered, tracked
    as the send asked."""
    hostile = "<a '" * 250_000
    started = time.monotonic()
    sending = asyncio.create_task(api.call("POST", "/v1/send", json={
        "to": "ann@example.org", "subject": "s", "body": hostile, "tracking": {"opens": True, "clicks": True}}))
    await asyncio.sleep(0)
    health = await api.client.get("/health")
    assert health.status == 200 and time.monotonic() - started < 5.0
    status, reply = await sending
    assert status == 200, reply
    status, reply = await api.call("POST", "/v1/send", json={
        "to": "bob@example.org", "subject": "s", "body": "<p>Hi <![ there</p>", "tracking": {"opens": True}})
    assert status == 200, reply
    status, digits = await api.call("POST", "/v1/send", json={
        "to": "cy@example.org", "subject": "s", "body": "<p>&#" + "9" * 5000 + ";</p>", "tracking": {"clicks": True}})
    assert status == 200, digits
    assert time.monotonic() - started < 5.0
    folder = tmp_path / "out"
    await dispatch_all(tracking_dispatcher(api, folder))
    assert time.monotonic() - started < 15.0
    messages = delivered(folder)
    signer = api.client.app[TRACKING]
    ann = messages["ann@example.org"][1]
    assert len(pixels(html_of(ann))) == 1 and html_of(ann).startswith(hostile)
    bob = messages["bob@example.org"][1]
    assert pixels(html_of(bob)) == [signer.open_url(reply["data"]["emails"][0]["email"])]
    assert bob.get_body(("plain",)).get_content().strip() == "Hi"  # `<![ there</p>`: a bogus comment, as in HTML
    assert messages["cy@example.org"][1].get_body(("plain",)).get_content().strip() == "\ufffd"
