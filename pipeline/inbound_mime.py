"""Reading an inbound message, bounded: what `email.received` says of it and the attachments kept.

The bytes are parsed with the stdlib's compat32 policy (no header is folded or refolded; headers are
decoded here, each bounded), and the tree is walked depth first under MAX_PARTS and MAX_DEPTH: a message
over them, or over the size limit, is refused whole (`MessageRefused`, an SMTP reply for the sender),
never half stored. Text and HTML bodies (decoded, CRLF as LF, NUL dropped) go into the event cut at
`event_body_chars` (the whole message stays fetchable as /inbound/:id/raw); a filename is made safe and
cut at MAX_FILENAME characters.
"""

from __future__ import annotations

import email
import email.errors
import email.message
import email.policy
import email.utils
import re
import unicodedata
from dataclasses import dataclass, field
from email.header import decode_header, make_header
from typing import Any

from pydantic_core import PydanticCustomError

from pipeline.grammar import header_address, header_addresses, normalize_email
from pipeline.mime_bounds import header_refusal, parse_problem

MAX_PARTS = 100
"""MIME parts (multipart containers included) a message may have."""
MAX_DEPTH = 10
"""Nesting of multiparts (and attached messages) a message may have."""
MAX_FILENAME = 255
MAX_HEADER_CHARS = 2000
"""Each header of interest, decoded, is cut at this length."""
HEADERS_OF_INTEREST = ("message-id", "in-reply-to", "references", "reply-to", "date")
_CONTENT_TYPE = re.compile(r"[a-z0-9][a-z0-9!#$&^_.+-]{0,126}/[a-z0-9][a-z0-9!#$&^_.+-]{0,126}")
_UNSAFE_FILENAME = re.compile(r'[\x00-\x1f\x7f"\\/:*?<>|;]+')


class MessageRefused(Exception):
    """The message is not taken: `reply` is the SMTP reply for the DATA command."""

    def __init__(self, reply: str) -> None:
        super().__init__(reply)
        self.reply = reply


@dataclass
class Attachment:
    filename: str
    content_type: str
    data: bytes


@dataclass
class ParsedMessage:
    sender: str | None
    """The From header's address, normalized; None when it has none that is valid."""
    from_header: str
    to: list[str]
    subject: str
    text: str | None
    html: str | None
    headers: dict[str, str]
    attachments: list[Attachment] = field(default_factory=list)
    truncated: list[str] = field(default_factory=list)
    """'text' and/or 'html' when the event's copy was cut."""

    def event_data(self) -> dict[str, Any]:
        """The parts of `email.received`'s data that come from the message itself (attachments without ids)."""
        return {"from": self.from_header, "to": self.to, "subject": self.subject, "text": self.text,
                "html": self.html, "headers": self.headers, "truncated": self.truncated}


def parse_message(raw: bytes, max_bytes: int, event_body_chars: int) -> ParsedMessage:
    """Parse `raw` within the bounds above, or raise `MessageRefused`."""
    if len(raw) > max_bytes:
        raise MessageRefused(f"552 5.3.4 Message too big for this server (at most {max_bytes} bytes)")
    refusal = header_refusal(raw)
    if refusal is not None:
        raise MessageRefused(refusal)
    problem = parse_problem(raw)
    if problem is not None:
        raise MessageRefused(f"552 5.3.4 Message too complex for this server: {problem}")
    message = email.message_from_bytes(raw, policy=email.policy.compat32)
    leaves = _leaves(message)
    text = html = None
    attachments: list[Attachment] = []
    for part in leaves:
        kind = _content_type(part)
        is_attachment = (part.get_content_disposition() == "attachment" or part.get_filename() is not None
                         or kind not in ("text/plain", "text/html"))
        if not is_attachment and kind == "text/plain" and text is None:
            text = _decoded_text(part)
        elif not is_attachment and kind == "text/html" and html is None:
            html = _decoded_text(part)
        else:
            attachments.append(Attachment(safe_filename(part.get_filename(), len(attachments) + 1), kind,
                                          _payload_bytes(part)))
    truncated: list[str] = []
    if text is not None and len(text) > event_body_chars:
        text, truncated = text[:event_body_chars], [*truncated, "text"]
    if html is not None and len(html) > event_body_chars:
        html, truncated = html[:event_body_chars], [*truncated, "html"]
    from_header = header_text(message, "from")
    return ParsedMessage(sender=_address(from_header), from_header=from_header,
                         to=header_addresses([header_text(message, "to"), header_text(message, "cc")])[:100],
                         subject=header_text(message, "subject"), text=text, html=html,
                         headers={name: value for name in HEADERS_OF_INTEREST if (value := header_text(message, name))},
                         attachments=attachments, truncated=truncated)


def _leaves(message: email.message.Message) -> list[email.message.Message]:
    """The non-multipart parts in order, an attached message counting as one leaf (kept as an attachment);
    refused past MAX_PARTS or MAX_DEPTH. Iterative: no recursion a hostile message could deepen."""
    leaves: list[email.message.Message] = []
    stack: list[tuple[email.message.Message, int]] = [(message, 0)]
    seen = 0
    while stack:
        part, depth = stack.pop()
        seen += 1
        if seen > MAX_PARTS:
            raise MessageRefused(f"554 5.6.0 Message has more than {MAX_PARTS} MIME parts")
        if depth > MAX_DEPTH:
            raise MessageRefused(f"554 5.6.0 Message nests MIME parts deeper than {MAX_DEPTH} levels")
        if part.is_multipart() and part.get_content_maintype() == "multipart":
            children = part.get_payload()
            if isinstance(children, list):
                stack.extend((child, depth + 1) for child in reversed(children)
                             if isinstance(child, email.message.Message))
                continue
        leaves.append(part)
    return leaves


def _content_type(part: email.message.Message) -> str:
    kind = part.get_content_type()
    return kind if _CONTENT_TYPE.fullmatch(kind) else "application/octet-stream"


def _payload_bytes(part: email.message.Message) -> bytes:
    if part.is_multipart():
        inner = part.get_payload()
        return b"".join(m.as_bytes() for m in inner if isinstance(m, email.message.Message))
    data = part.get_payload(decode=True)
    return data if isinstance(data, bytes) else b""


def _decoded_text(part: email.message.Message) -> str:
    data = _payload_bytes(part)
    charset = part.get_content_charset() or "utf-8"
    try:
        text = data.decode(charset, "replace")
    except (LookupError, ValueError):
        text = data.decode("utf-8", "replace")
    return text.replace("\x00", "").replace("\r\n", "\n")


def header_text(message: email.message.Message, name: str) -> str:
    """The header's first value, RFC 2047 words decoded, on one line, cut at MAX_HEADER_CHARS."""
    value = message.get(name)
    if value is None:
        return ""
    value = str(value)[:MAX_HEADER_CHARS * 4]
    try:
        value = str(make_header(decode_header(value)))
    except (LookupError, ValueError, UnicodeError, email.errors.HeaderParseError):
        pass
    return " ".join(value.replace("\x00", "").split())[:MAX_HEADER_CHARS]


def _address(from_header: str) -> str | None:
    address = header_address(from_header)
    if not address:
        return None
    try:
        return normalize_email(address)
    except PydanticCustomError:
        return None


def safe_filename(name: str | None, number: int) -> str:
    """The last path segment of `name`, without control or shell/path characters, NFC, at most
    MAX_FILENAME characters with its extension kept; `attachment-<number>` when nothing is left."""
    if name:
        name = unicodedata.normalize("NFC", str(name)).replace("\\", "/").rsplit("/", 1)[-1]
        name = _UNSAFE_FILENAME.sub("_", name).strip(" .")
    if not name:
        return f"attachment-{number}"
    if len(name) > MAX_FILENAME:
        stem, dot, extension = name.rpartition(".")
        if dot and 0 < len(extension) <= 16:
            name = stem[:MAX_FILENAME - len(extension) - 1] + "." + extension
        else:
            name = name[:MAX_FILENAME]
    return name
