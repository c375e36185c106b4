"""Reading the reports that come back to a VERP address: delivery status notifications (RFC 3464,
`multipart/report; report-type=delivery-status`) and complaint reports (ARF, RFC 5965,
`report-type=feedback-report`).

Bounded on hostile input: the message is already within `inbound.max_message_bytes`; only the top-level
parts are looked at (at most `MAX_PARTS`), found with `bytes.find`; each header block read is cut at
`MAX_HEADER_BYTES` and the Content-Type at `MAX_PARAMETER_FIELD` characters before the email package parses its
parameters (its parameter splitter is quadratic in the number of quotes); at most `MAX_RECIPIENTS`
per-recipient blocks are read. No regular expression runs over client bytes, so nothing can backtrack.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from email.message import Message
from email.parser import BytesHeaderParser
from email.policy import compat32

from pipeline.mime_bounds import MAX_PARAMETER_FIELD

MAX_PARTS = 16
MAX_HEADER_BYTES = 64 * 1024
MAX_RECIPIENTS = 100
MAX_VALUE = 2048
"""Characters kept of a field's value (a diagnostic, an address)."""
ORIGINAL_TYPES = ("message/rfc822", "text/rfc822-headers", "message/rfc822-headers")


@dataclass
class RecipientStatus:
    final_recipient: str
    action: str
    status: str
    diagnostic: str
    remote_mta: str

    @property
    def permanent(self) -> bool:
        """A hard bounce: the action `failed` with a 5.x.x status (or none). `delayed`, or a 4.x.x status, is
        soft: the address stays."""
        return self.action == "failed" and not self.status.startswith("4")

    @property
    def bounce(self) -> bool:
        return self.action in ("failed", "delayed")


@dataclass
class DeliveryReport:
    reporting_mta: str
    recipients: list[RecipientStatus] = field(default_factory=list)

    def first_bounce(self) -> RecipientStatus | None:
        """The recipient the bounce is recorded from: a failed one before a delayed one."""
        bounces = [r for r in self.recipients if r.bounce]
        return next((r for r in bounces if r.action == "failed"), bounces[0] if bounces else None)


@dataclass
class FeedbackReport:
    feedback_type: str
    user_agent: str
    original_rcpt_to: str
    original_mail_from: str
    source_ip: str
    original_message_id: str
    """The Message-ID of the message complained about (the report's third part), or ''."""
    original_return_path: str
    """Its Return-Path (a VERP address when plunkd sent it with one), or ''."""


def parse_report(raw: bytes) -> DeliveryReport | FeedbackReport | None:
    """The DSN or ARF report `raw` is, or None (an auto-reply, anything else, or a report too malformed to read)."""
    split = _header_end(raw)
    headers = _headers(raw[:split])
    content_type = _content_type(headers)
    if content_type is None or content_type.get_content_type() != "multipart/report":
        return None
    report_type = str(content_type.get_param("report-type", "") or "").lower()
    boundary = content_type.get_boundary()
    if report_type not in ("delivery-status", "feedback-report") or not boundary or len(boundary) > 200:
        return None
    parts = _parts(raw[split:], boundary.encode("ascii", "replace"))
    if report_type == "delivery-status":
        return _delivery_report(parts)
    return _feedback_report(parts)


def _header_end(raw: bytes) -> int:
    """Where the header block ends (after its blank line), looking no further than MAX_HEADER_BYTES."""
    if raw.startswith((b"\r\n", b"\n")):
        return 2 if raw.startswith(b"\r\n") else 1
    crlf, lf = raw.find(b"\r\n\r\n", 0, MAX_HEADER_BYTES), raw.find(b"\n\n", 0, MAX_HEADER_BYTES)
    ends = [end + 4 for end in (crlf,) if end >= 0] + [end + 2 for end in (lf,) if end >= 0]
    return min(ends) if ends else min(len(raw), MAX_HEADER_BYTES)


def _headers(block: bytes) -> Message:
    return BytesHeaderParser(policy=compat32).parsebytes(block[:MAX_HEADER_BYTES], headersonly=True)


def _content_type(headers: Message) -> Message | None:
    """The Content-Type alone in a message of its own, for the email package's parameter parsing; None
    when it is missing or longer than `MAX_PARAMETER_FIELD`."""
    value = headers.get("Content-Type")
    if value is None or len(str(value)) > MAX_PARAMETER_FIELD:
        return None
    holder = Message(policy=compat32)
    holder["Content-Type"] = " ".join(str(value).split())
    return holder


def _parts(body: bytes, boundary: bytes) -> list[tuple[Message, bytes]]:
    """The top-level parts (headers, body) between `--boundary` lines, at most MAX_PARTS."""
    text = b"\n" + body
    marker = b"\n--" + boundary
    parts: list[tuple[Message, bytes]] = []
    at = text.find(marker)
    while at >= 0 and len(parts) < MAX_PARTS:
        after = at + len(marker)
        line_end = text.find(b"\n", after)
        if text[after:after + 2] == b"--" or line_end < 0:
            break
        at = text.find(marker, line_end)
        part = text[line_end + 1:at if at >= 0 else len(text)].removesuffix(b"\r")
        split = _header_end(part)
        parts.append((_headers(part[:split]), part[split:]))
    return parts


def _part_of(parts: list[tuple[Message, bytes]], *content_types: str) -> bytes | None:
    for headers, body in parts:
        content_type = _content_type(headers)
        if content_type is not None and content_type.get_content_type() in content_types:
            return body
    return None


def _value(fields: Message, name: str) -> str:
    """A field's value with folding undone and any `type;` prefix (`rfc822;`, `smtp;`, `dns;`) kept out."""
    value = " ".join(str(fields.get(name, "")).split())[:MAX_VALUE]
    kind, semicolon, rest = value.partition(";")
    kind = kind.strip()
    typed = bool(semicolon) and 0 < len(kind) <= 32 and all(c.isalnum() or c in "-_." for c in kind)
    return rest.strip() if typed else value


def _blocks(body: bytes) -> list[Message]:
    """The field blocks of a message/delivery-status body (per-message, then one per recipient), split at
    blank lines; at most 1 + MAX_RECIPIENTS."""
    text = body[:MAX_HEADER_BYTES * 4].replace(b"\r\n", b"\n")
    blocks = []
    for block in text.split(b"\n\n", 1 + MAX_RECIPIENTS):
        if block.strip():
            blocks.append(_headers(block.strip(b"\n") + b"\n"))
        if len(blocks) > MAX_RECIPIENTS:
            break
    return blocks


def _delivery_report(parts: list[tuple[Message, bytes]]) -> DeliveryReport | None:
    status_body = _part_of(parts, "message/delivery-status", "message/global-delivery-status")
    if status_body is None:
        return None
    blocks = _blocks(status_body)
    if not blocks:
        return None
    report = DeliveryReport(_value(blocks[0], "Reporting-MTA"))
    for block in blocks[1:] if len(blocks) > 1 else blocks:
        action = _value(block, "Action").lower()
        if not action:
            continue
        report.recipients.append(RecipientStatus(
            final_recipient=_value(block, "Final-Recipient") or _value(block, "Original-Recipient"),
            action=action, status=_value(block, "Status"), diagnostic=_value(block, "Diagnostic-Code"),
            remote_mta=_value(block, "Remote-MTA")))
    return report if report.recipients else None


def _feedback_report(parts: list[tuple[Message, bytes]]) -> FeedbackReport | None:
    feedback_body = _part_of(parts, "message/feedback-report")
    if feedback_body is None:
        return None
    fields = _blocks(feedback_body)
    if not fields:
        return None
    report = fields[0]
    original_body = _part_of(parts, *ORIGINAL_TYPES) or b""
    original = _headers(original_body[:_header_end(original_body)])
    return FeedbackReport(
        feedback_type=_value(report, "Feedback-Type").lower() or "abuse", user_agent=_value(report, "User-Agent"),
        original_rcpt_to=_value(report, "Original-Rcpt-To"), original_mail_from=_value(report, "Original-Mail-From"),
        source_ip=_value(report, "Source-IP"), original_message_id=_value(original, "Message-ID"),
        original_return_path=_value(original, "Return-Path").strip("<>"))
