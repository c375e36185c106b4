"""Building the MIME of an API send, and the template language `{{var}}` / `{{var ?? default}}`."""

from __future__ import annotations

import base64
import binascii
import functools
import html
import json
import re
from collections import Counter
from dataclasses import dataclass, field
from email.header import Header
from email.utils import formataddr
from typing import Any, NamedTuple
from urllib.parse import quote

from core.randomness import random_hex
from pipeline import html_tokens
from pipeline.errors import FieldError, ValidationFailed
from pipeline.links import LinkSigner
from pipeline.marketing.layout import plunk_layout

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
MAX_RENDERED_HEADER = 16 * 1024
"""Octets one header value (Subject, a custom header) may render to: folding costs grow with it (a
megabyte takes over a second), and no mail client shows that much."""
_FOLD_CHUNK = re.compile(r"[ \t]*[^ \t]+|[ \t]+")


_NAME = re.compile(r"[A-Za-z0-9_.\-]+")
_SPACE = re.compile(r"\s*")
_OPEN = re.compile(r"\{\{(?!\{)")
"""Where a variable may start: in a run of braces only the last two can open one."""
MAX_INDEX_DIGITS = 9
"""A path segment of more digits is no list index (it cannot be one, and `int()` of a long run is slow)."""


class RenderOverflow(Exception):
    """A render went over its byte limit; nothing past the limit was produced."""


class Use(NamedTuple):
    """One `{{name}}` or `{{name ?? default}}` of a template (`default` without its quotes, '' if none)."""

    name: str
    default: str


def lookup(variables: dict[str, Any], name: str) -> Any:
    """The value `name` refers to: the key `name` itself when there is one (a flat `{"a.b": 1}`), else
    the dotted path: each segment reaches into an object by key, or into a list by 0-based index
    (`items.0.name`). None when nothing is there."""
    if name in variables:
        return variables[name]
    if "." not in name:
        return None
    value: Any = variables
    for key in name.split("."):
        if isinstance(value, dict):
            value = value.get(key)
        elif isinstance(value, list) and key.isdigit() and len(key) <= MAX_INDEX_DIGITS:
            index = int(key)
            value = value[index] if index < len(value) else None
        else:
            return None
    return value


def as_text(value: Any) -> str:
    """A variable's value as it is written: true/false in lower case, an object or a list as JSON."""
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, dict | list):
        return json.dumps(value, ensure_ascii=False, default=str)
    return str(value)


def byte_length(text: str) -> int:
    """UTF-8 octets of `text` (a lone surrogate, which JSON data can hold, counts 3 instead of raising)."""
    return len(text) if text.isascii() else len(text.encode("utf-8", "surrogatepass"))


def _after_space(text: str, pos: int) -> int:
    """The first position at or after `pos` that is not white space."""
    space = _SPACE.match(text, pos)
    return space.end() if space else pos


class _Scanner:
    """Finds the variables of one template in a single pass.

    A default ends before the whitespace in front of the first `}}` after it and may not hold a line
    break. What one search learns is kept (where the next `}}` is, where no default can end), so a
    template full of unclosed `{{a ??` costs one pass, not one per `{{`."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.close_from = self.close_at = self.default_stop = -1
        """A default starting in [close_from, close_at] stops at default_stop, before the `}}` at close_at."""
        self.dead_through = -1
        """A default starting at or before this position has no end."""

    def variable(self, at: int) -> tuple[Use, int] | None:
        """The variable whose `{{` is at `at` and the position after its `}}`; None when there is none."""
        text = self.text
        name = _NAME.match(text, _after_space(text, at + 2))
        if name is None:
            return None
        pos = _after_space(text, name.end())
        if text.startswith("}}", pos):
            return Use(name.group(), ""), pos + 2
        if not text.startswith("??", pos):
            return None
        start = _after_space(text, pos + 2)
        stop = self._default_stop(start)
        if stop is None:
            return None
        return Use(name.group(), text[start:stop].strip("\"'")), self.close_at + 2

    def _default_stop(self, start: int) -> int | None:
        if start <= self.dead_through:
            return None
        text = self.text
        if not self.close_from <= start <= self.close_at:
            close = text.find("}}", start)
            if close < 0:
                self.dead_through = len(text)
                return None
            self.close_from, self.close_at = start, close
            self.default_stop = start + len(text[start:close].rstrip())
        stop = max(start, self.default_stop)
        newline = text.rfind("\n", start, stop)
        if newline >= 0:
            self.dead_through = newline
            return None
        return stop


class Template:
    """A template of the `{{name}}` / `{{name ?? default}}` language, parsed once (in linear time).

    `{{name}}` is the variable's value; `{{name ?? default}}` is the default (quotes around it dropped,
    written as given) when the value is missing, null or "". Whitespace may surround the name, `??`
    and the default; a default ends at the first `}}` and does not span lines. Names are letters,
    digits, `_`, `.` and `-`, looked up by `lookup` (dotted paths reach into objects and lists). A value
    renders as text: true/false in lower case, an object or list as JSON. Anything else is literal text.
    """

    def __init__(self, text: str) -> None:
        scanner = _Scanner(text)
        parts: list[str | Use] = []
        literal_from = 0
        opening = _OPEN.search(text)
        while opening is not None:
            at = opening.start()
            found = scanner.variable(at)
            if found is None:
                opening = _OPEN.search(text, at + 1)
                continue
            use, end = found
            if at > literal_from:
                parts.append(text[literal_from:at])
            parts.append(use)
            literal_from = end
            opening = _OPEN.search(text, end)
        if literal_from < len(text):
            parts.append(text[literal_from:])
        self.parts = parts
        self.sizes = [byte_length(part) if isinstance(part, str) else -1 for part in parts]
        self.uses = Counter(part for part in parts if isinstance(part, Use))
        """How often each variable (with its default) is used."""
        self.literal_bytes = sum(size for size in self.sizes if size > 0)

    def render(self, variables: dict[str, Any], escape: bool = False, limit: int | None = None) -> str:
        """The text with each variable filled (values HTML-escaped with `escape`); RenderOverflow as soon
        as it would be longer than `limit` UTF-8 octets."""
        return self.render_sized(variables, escape, limit)[0]

    def render_sized(self, variables: dict[str, Any], escape: bool = False,
                     limit: int | None = None) -> tuple[str, int]:
        """`render`, and the result's length in UTF-8 octets."""
        pieces: list[str] = []
        filled: dict[Use, tuple[str, int]] = {}
        total = 0
        for part, size in zip(self.parts, self.sizes, strict=True):
            if isinstance(part, Use):
                known = filled.get(part)
                if known is None:
                    text = self._fill(part, variables, escape)
                    known = filled[part] = (text, byte_length(text))
                part, size = known
            total += size
            if limit is not None and total > limit:
                raise RenderOverflow
            pieces.append(part)
        return "".join(pieces), total

    def size(self, variables: dict[str, Any], escape: bool = False) -> int:
        """The rendered length in UTF-8 octets, without rendering (one lookup per distinct variable)."""
        return self.literal_bytes + sum(count * byte_length(self._fill(use, variables, escape))
                                        for use, count in self.uses.items())

    @staticmethod
    def _fill(use: Use, variables: dict[str, Any], escape: bool) -> str:
        value = lookup(variables, use.name)
        if value is None or value == "":
            return use.default
        text = as_text(value)
        return html.escape(text) if escape else text


SHARED_TEMPLATE_CHARS = 16_384
"""Texts up to this long are parsed once per process (`parsed_template`): at most 256 of them are kept."""


def parsed_template(text: str) -> Template:
    """`Template(text)`, parsed once for every send that repeats it (an application's subject lines and
    templated bodies) when it is at most SHARED_TEMPLATE_CHARS long: parsing cost 8 µs of a /v1/send even for a
    one-line subject. A longer text is parsed for its caller alone, so the shared cache stays small."""
    return _shared_template(text) if len(text) <= SHARED_TEMPLATE_CHARS else Template(text)


@functools.lru_cache(maxsize=256)
def _shared_template(text: str) -> Template:
    """A Template is never changed once parsed, so one may serve every send."""
    return Template(text)


def render(template: str, variables: dict[str, Any], escape: bool = False, limit: int | None = None) -> str:
    """Fill `{{name}}` and `{{name ?? default}}` (see `Template`); unknown names without a default become ''."""
    return Template(template).render(variables, escape, limit)


_TEXT_BLOCKS = {"p", "div", "br", "tr", "li", "h1", "h2", "h3", "h4", "h5", "h6", "table"}
"""Elements that start and end a line of the plain text."""
_TEXT_HIDDEN = {"head", "script", "style"}
"""Elements whose text is left out."""
_SPACE_RUN = re.compile(r"[ \t]+")
_BLANK_LINES = re.compile(r"\n{3,}")


def html_to_text(markup: str) -> str:
    """The plain-text alternative of an HTML body: its text, a line per block, each link's target after its
    text, nothing of the head, scripts or styles. Linear in the markup's length (`pipeline.html_tokens`)."""
    parts: list[str] = []
    hidden = 0
    href: str | None = None
    for token in html_tokens.TOKEN.finditer(markup):
        text = token.group("text")
        if text is not None:
            if not hidden:
                parts.append(html_tokens.unescape(text))
            continue
        name = token.group("name")
        if name is None:  # a script or a style (hidden whole), a comment or a declaration
            continue
        name = name.lower()
        closing = token.group("closing")
        for is_end in (True,) if closing else (False, True) if html_tokens.self_closing(token) else (False,):
            if name in _TEXT_HIDDEN:
                hidden = max(0, hidden - 1) if is_end else hidden + 1
            elif name in _TEXT_BLOCKS:
                parts.append("\n")
            elif name == "a" and not is_end:
                href = dict(html_tokens.attributes(token)).get("href")
            elif name == "a" and href:
                parts.append(f" ({href})")
                href = None
    lines = [line.strip() for line in _SPACE_RUN.sub(" ", "".join(parts)).splitlines()]
    return _BLANK_LINES.sub("\n\n", "\n".join(lines)).strip() + "\n"


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
    boundary = f"=_plunkd_{random_hex(16)}"
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
    feedback_id: str | None = None
    """Set on bulk mail (campaigns, workflow sends; `bulk_feedback_id`): the message carries it as
    `Feedback-ID`, with `Precedence: bulk`. Transactional mail (`/v1/send`, the relay) has neither."""

    _parsed: dict[str, Template] = field(default_factory=dict, init=False, repr=False, compare=False)
    """Each template text parsed once: a campaign's spec composes every recipient's message."""

    def template(self, text: str) -> Template:
        parsed = self._parsed.get(text)
        if parsed is None:
            parsed = self._parsed[text] = parsed_template(text)
        return parsed

    def build(self, recipient: str, variables: dict[str, Any], limit: int | None = None) -> bytes:
        """One recipient's message. With `limit` (octets; `smtp.max_message_bytes`) MessageTooLarge, naming
        the field, as soon as what is rendered goes over it (subject, then each header, then the body share
        it, and nothing past it is produced), or when the composed message (with the MIME around, a text
        part beside the HTML, and attachments) is bigger."""
        budget = _Budget(limit)
        contact_links = None
        if self.links is not None:
            contact_links = self.links.links(variables["plunk_id"], self.from_email, self.campaign_id)
            variables = {**variables, "unsubscribe_url": contact_links.unsubscribe,
                         "subscribe_url": contact_links.subscribe, "preferences_url": contact_links.preferences}
        lines = [header_line("From", self.from_name, self.from_email), header_line("To", "", recipient),
                 header_line("Subject", budget.take("subject", self.template(self.subject), variables))]
        if self.reply_to:
            lines.append(header_line("Reply-To", "", self.reply_to))
        lines += [header_line(name, budget.take(f"headers.{name}", self.template(value), variables))
                  for name, value in self.headers.items()]
        if contact_links is not None:
            lines.append(header_line("List-Unsubscribe", f"<{contact_links.unsubscribe}>, <{contact_links.mailto}>"))
            lines.append("List-Unsubscribe-Post: List-Unsubscribe=One-Click")
        if self.feedback_id is not None:
            lines.append(header_line("Feedback-ID", self.feedback_id))
            lines.append("Precedence: bulk")
        lines.append("MIME-Version: 1.0")
        body = self.template(self.body)
        if self.style == "PLUNK":
            markup = budget.peek("body", body, variables, escape=True)
            if not looks_like_html(markup):
                markup = text_to_html(budget.peek("body", body, variables))
            markup = budget.check("body", plunk_layout(markup, contact_links))
            content = _multipart("alternative", [_text_part(html_to_text(markup), "plain"),
                                                 _text_part(markup, "html")])
        elif looks_like_html(self.body):
            markup = budget.peek("body", body, variables, escape=True)
            content = _multipart("alternative", [_text_part(html_to_text(markup), "plain"),
                                                 _text_part(markup, "html")])
        else:
            content = _text_part(budget.peek("body", body, variables), "plain")
        if self.attachments:
            content = _multipart("mixed", [content, *(_attachment_part(a) for a in self.attachments)])
        message = ("\r\n".join(lines) + "\r\n").encode("utf-8") + content
        if limit is not None and len(message) > limit:
            raise too_large("attachments" if self.attachments else "body", limit)
        return message


def bulk_feedback_id(stream_id: str, project_id: str, from_email: str) -> str:
    """The `Feedback-ID` of bulk mail, `stream:project:sender` as Gmail's feedback loop reads it (the last
    field identifies the sender, the others are aggregated over): the stream is the campaign's or the
    workflow's id, the sender the From address's domain."""
    return f"{stream_id}:{project_id}:{from_email.rsplit('@', 1)[-1].lower()}"


class MessageTooLarge(ValidationFailed):
    """A message that renders, or composes, to more than a size limit (422 naming the field at the API)."""

    def __init__(self, field_name: str, detail: str) -> None:
        super().__init__([FieldError(field_name, detail, "too_big")], message=f"The email is too large: {detail}",
                         suggestion="Send less content, or template variables with smaller values.")


class _Budget:
    """The octets one message may still render (None: no limit). `take` renders a header value and spends
    on it (one header renders to at most `MAX_RENDERED_HEADER`); `peek` renders the body (which may be
    rendered twice) within what is left, and `check` holds the body's markup to it too."""

    def __init__(self, limit: int | None) -> None:
        self.limit = limit
        self.left = limit

    def take(self, field_name: str, template: Template, variables: dict[str, Any]) -> str:
        header_bound = self.left is None or self.left > MAX_RENDERED_HEADER
        try:
            text, size = template.render_sized(variables, False, MAX_RENDERED_HEADER if header_bound else self.left)
        except RenderOverflow:
            if header_bound:
                raise MessageTooLarge(field_name, f"{field_name} renders to more than {MAX_RENDERED_HEADER} "
                                                  "bytes, the limit for one header") from None
            raise self._over(field_name) from None
        if self.left is not None:
            self.left -= size
        return text

    def peek(self, field_name: str, template: Template, variables: dict[str, Any], escape: bool = False) -> str:
        try:
            return template.render(variables, escape, self.left)
        except RenderOverflow:
            raise self._over(field_name) from None

    def check(self, field_name: str, text: str) -> str:
        if self.left is not None and byte_length(text) > self.left:
            raise self._over(field_name)
        return text

    def _over(self, field_name: str) -> MessageTooLarge:
        assert self.limit is not None
        return too_large(field_name, self.limit)


def too_large(field_name: str, limit: int) -> MessageTooLarge:
    return MessageTooLarge(field_name, f"{field_name} makes the email larger than {limit} bytes once rendered "
                                       "(the message size limit, smtp.max_message_bytes)")
