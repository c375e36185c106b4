"""Building the MIME of an API send, and the template language `{{var}}` / `{{var ?? default}}`."""

from __future__ import annotations

import base64
import binascii
import html
import re
import uuid
from dataclasses import dataclass, field
from email.header import Header
from email.utils import formataddr
from html.parser import HTMLParser
from typing import Any
from urllib.parse import quote

from pipeline.layout import plunk_layout
from pipeline.links import LinkSigner

VARIABLE = re.compile(r"\{\{\s*([A-Za-z0-9_.\-]+)\s*(?:\?\?\s*(.*?)\s*)?\}\}")
HTML_HINT = re.compile(r"<\s*(html|body|p|div|br|table|a|span|h[1-6]|img|strong|em|b|i|ul|ol|li)\b", re.I)
HEADER_NAME = re.compile(r"[!-9;-~]{1,76}")
"""A header field name (printable ASCII but ':'), short enough that `Name: ` leaves room on a line.
Use with `fullmatch`: with `match`, a `$` anchor would let a trailing newline through."""
HEADER_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")
"""What never goes into a header value: the C0 controls but TAB, and DEL. CR and LF would end the field
and start another; RFC 5322 allows none of the others, and some parsers (Python's `str.splitlines`
among them) break lines at VT, FF and FS to RS."""


@dataclass(frozen=True)
class HeaderRule:
    """Header fields (by exact name or name prefix, any case) a sender may not write, and why."""

    why: str
    names: frozenset[str]
    prefixes: tuple[str, ...] = ()

    def covers(self, name: str) -> bool:
        lowered = name.lower()
        return lowered in self.names or lowered.startswith(self.prefixes)


AUTHENTICATION_VERDICTS = HeaderRule("authentication results are asserted by the servers that check a message",
                                     frozenset({"authentication-results", "received-spf"}), ("arc-",))
SES_INSTRUCTIONS = HeaderRule("instructions to Amazon SES are the operator's", frozenset(), ("x-ses-",))
RESERVED_HEADERS = (
    HeaderRule("written from the request's from, name, to, subject and reply",
               frozenset({"from", "sender", "to", "cc", "bcc", "reply-to", "subject"})),
    HeaderRule("written by plunkd when it sends the message (one Message-ID per recipient's message)",
               frozenset({"message-id", "date"})),
    HeaderRule("the body's MIME structure, written by plunkd", frozenset({"mime-version"}), ("content-",)),
    HeaderRule("signatures are made by the signing domain's servers (plunkd signs with DKIM)",
               frozenset({"dkim-signature", "domainkey-signature", "x-google-dkim-signature"})),
    HeaderRule("trace fields are written by the mail servers a message passes through",
               frozenset({"received", "return-path", "delivered-to", "x-original-to"}), ("resent-",)),
    AUTHENTICATION_VERDICTS,
    SES_INSTRUCTIONS,
)
"""The one deny list for the custom `headers` of `POST /v1/send` (README, "Custom headers"); every other
field name (printable ASCII, `HEADER_NAME`) is allowed: X-*, List-*, In-Reply-To, References, Keywords..."""
SUBMISSION_STRIPPED_HEADERS = (AUTHENTICATION_VERDICTS, SES_INSTRUCTIONS)
"""Removed from a message a client submits over SMTP (see `pipeline.submit.strip_fields`): a relaying
client's own Received fields and DKIM signatures are normal and kept, but no receiver should believe its
authentication results, and no tenant may steer the operator's SES account."""


def reserved_header(name: str) -> str | None:
    """Why `name` may not be set through a send's `headers`, or None when it may."""
    return next((rule.why for rule in RESERVED_HEADERS if rule.covers(name)), None)


FOLD_WIDTH = 78
MAX_LINE = 998
_FOLD_CHUNK = re.compile(r"[ \t]*[^ \t]+|[ \t]+")


def render(template: str, variables: dict[str, Any], escape: bool = False) -> str:
    """Fill `{{name}}` and `{{name ?? default}}`; unknown names without a default become ''."""

    def fill(match: re.Match[str]) -> str:
        value = variables.get(match.group(1))
        if value is None or value == "":
            default = match.group(2) or ""
            return default.strip("\"'")
        text = value if isinstance(value, str) else str(value).lower() if isinstance(value, bool) else str(value)
        return html.escape(text) if escape else text

    return VARIABLE.sub(fill, template)


class _TextExtractor(HTMLParser):
    BLOCKS = {"p", "div", "br", "tr", "li", "h1", "h2", "h3", "h4", "h5", "h6", "table"}

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self.skip = 0
        self.href: str | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in ("style", "script", "head"):
            self.skip += 1
        elif tag in self.BLOCKS:
            self.parts.append("\n")
        elif tag == "a":
            self.href = dict(attrs).get("href")

    def handle_endtag(self, tag: str) -> None:
        if tag in ("style", "script", "head"):
            self.skip = max(0, self.skip - 1)
        elif tag in self.BLOCKS:
            self.parts.append("\n")
        elif tag == "a" and self.href:
            self.parts.append(f" ({self.href})")
            self.href = None

    def handle_data(self, data: str) -> None:
        if not self.skip:
            self.parts.append(data)


def html_to_text(markup: str) -> str:
    parser = _TextExtractor()
    parser.feed(markup)
    parser.close()
    lines = [re.sub(r"[ \t]+", " ", line).strip() for line in "".join(parser.parts).splitlines()]
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip() + "\n"


def looks_like_html(body: str) -> bool:
    return bool(HTML_HINT.search(body))


@dataclass
class Attachment:
    filename: str
    content: bytes
    content_type: str


def is_safe_header_value(value: str) -> bool:
    """True when `value` can go into a header as given: no control character but TAB."""
    return HEADER_CONTROL.search(value) is None


def header_line(name: str, value: str, address: str | None = None) -> str:
    """`Name: value` as it goes into the message: the one place compose writes a header field.

    Every control character but TAB in `value` becomes a space, so no value, given or rendered from
    contact data, can end the field and start another. Printable ASCII is folded before whitespace
    into lines of at most 78 octets where its words allow; anything else (non-ASCII, or a word too long
    for a 998-octet line) is written as RFC 2047 encoded words, which fold anywhere.
    With `address`, the field is a mailbox (From, To, Reply-To) and `value` is its display name.
    """
    if not HEADER_NAME.fullmatch(name):
        raise ValueError(f"not a header field name: {name!r}")
    text = HEADER_CONTROL.sub(" ", value)
    if address is not None:
        return _mailbox_line(name, text.strip(), HEADER_CONTROL.sub(" ", address))
    if text.isascii():
        folded = _fold(f"{name}: {text}")
        if folded is not None:
            return folded
    return f"{name}: {_encoded_words(name, text)}"


def _mailbox_line(name: str, display_name: str, address: str) -> str:
    if not display_name:
        return f"{name}: {address}"
    if display_name.isascii():
        folded = _fold(f"{name}: {formataddr((display_name, address))}")
        if folded is not None:
            return folded
    return f"{name}: {_encoded_words(name, display_name)} <{address}>"


def _encoded_words(name: str, text: str) -> str:
    return Header(text, "utf-8", maxlinelen=FOLD_WIDTH, header_name=name).encode(linesep="\r\n")


def _fold(line: str) -> str | None:
    """Fold a printable-ASCII header line before whitespace (never before its first word) into lines
    of at most 78 octets where the words allow; None when a word does not fit a 998-octet line."""
    if len(line) <= FOLD_WIDTH:
        return line
    chunks = _FOLD_CHUNK.findall(line)
    lines, current = [], chunks[0]
    for index, chunk in enumerate(chunks[1:], 1):
        if index > 1 and len(current) + len(chunk) > FOLD_WIDTH and chunk[0] in " \t" and not chunk.isspace():
            lines.append(current)
            current = chunk
        else:
            current += chunk
    lines.append(current)
    if any(len(part) > MAX_LINE for part in lines):
        return None
    return "\r\n".join(lines)


def _text_part(text: str, subtype: str) -> bytes:
    normalized = text.replace("\r\n", "\n").replace("\r", "\n").encode("utf-8")
    encoded = binascii.b2a_qp(normalized, istext=True).replace(b"\n", b"\r\n")
    return (f'Content-Type: text/{subtype}; charset="utf-8"\r\n'
            "Content-Transfer-Encoding: quoted-printable\r\n\r\n").encode() + encoded + b"\r\n"


def _attachment_part(item: Attachment) -> bytes:
    if item.filename.isascii() and '"' not in item.filename:
        disposition = f'attachment; filename="{item.filename}"'
        type_name = f'; name="{item.filename}"'
    else:
        disposition = f"attachment; filename*=utf-8''{quote(item.filename, safe='')}"
        type_name = ""
    body = base64.encodebytes(item.content).replace(b"\n", b"\r\n")
    return (f"{header_line('Content-Type', item.content_type + type_name)}\r\n"
            "Content-Transfer-Encoding: base64\r\n"
            f"{header_line('Content-Disposition', disposition)}\r\n\r\n").encode() + body


def _multipart(subtype: str, parts: list[bytes]) -> bytes:
    boundary = f"=_plunkd_{uuid.uuid4().hex}"
    out = [f'Content-Type: multipart/{subtype}; boundary="{boundary}"\r\n\r\n'.encode()]
    for part in parts:
        out.append(f"--{boundary}\r\n".encode() + part)
    out.append(f"--{boundary}--\r\n".encode())
    return b"".join(out)


def text_to_html(text: str) -> str:
    """Plain text as HTML paragraphs, for a PLUNK-style body written without markup."""
    paragraphs = re.split(r"\n\s*\n", text.replace("\r\n", "\n").strip())
    return "\n".join(f"<p>{html.escape(p).replace(chr(10), '<br>')}</p>" for p in paragraphs if p)


@dataclass
class MessageSpec:
    """What an API send or a campaign asked for; `build` turns it into one recipient's message.

    The MIME is written directly (quoted-printable text, base64 attachments, RFC 2047 headers):
    `email.message.EmailMessage` costs over a millisecond per message, and this runs per recipient.
    With `links` the message is marketing mail: it carries the contact's signed unsubscribe link as
    `List-Unsubscribe` (with RFC 8058 one-click) and `{{unsubscribe_url}}`, `{{subscribe_url}}` and
    `{{preferences_url}}` are filled. `style` PLUNK wraps the body in the house layout (whose footer
    links there for marketing mail); HTML sends the body as written.
    """

    from_email: str
    from_name: str
    subject: str
    body: str
    reply_to: str | None = None
    headers: dict[str, str] = field(default_factory=dict)
    attachments: list[Attachment] = field(default_factory=list)
    style: str = "HTML"
    links: LinkSigner | None = None
    campaign_id: str | None = None

    def build(self, recipient: str, variables: dict[str, Any]) -> bytes:
        contact_links = None
        if self.links is not None:
            contact_links = self.links.links(variables["plunk_id"], self.from_email, self.campaign_id)
            variables = {**variables, "unsubscribe_url": contact_links.unsubscribe,
                         "subscribe_url": contact_links.subscribe, "preferences_url": contact_links.preferences}
        lines = [header_line("From", self.from_name, self.from_email), header_line("To", "", recipient),
                 header_line("Subject", render(self.subject, variables))]
        if self.reply_to:
            lines.append(header_line("Reply-To", "", self.reply_to))
        lines += [header_line(name, render(value, variables)) for name, value in self.headers.items()]
        if contact_links is not None:
            lines.append(header_line("List-Unsubscribe", f"<{contact_links.unsubscribe}>, <{contact_links.mailto}>"))
            lines.append("List-Unsubscribe-Post: List-Unsubscribe=One-Click")
        lines.append("MIME-Version: 1.0")
        if self.style == "PLUNK":
            markup = render(self.body, variables, escape=True)
            if not looks_like_html(markup):
                markup = text_to_html(render(self.body, variables))
            markup = plunk_layout(markup, contact_links)
            content = _multipart("alternative", [_text_part(html_to_text(markup), "plain"),
                                                 _text_part(markup, "html")])
        elif looks_like_html(self.body):
            markup = render(self.body, variables, escape=True)
            content = _multipart("alternative", [_text_part(html_to_text(markup), "plain"),
                                                 _text_part(markup, "html")])
        else:
            content = _text_part(render(self.body, variables), "plain")
        if self.attachments:
            content = _multipart("mixed", [content, *(_attachment_part(a) for a in self.attachments)])
        return ("\r\n".join(lines) + "\r\n").encode("utf-8") + content
