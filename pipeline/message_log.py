"""The message log's rules: which searches are allowed, what a stored message shows, and lifting a suppression.

Every search field is bounded (length, allowed values); a bad one is a `ValidationFailed` naming the field,
never a query. A stored message is parsed here for the dashboard: its headers, its HTML and text parts and
its attachments (listed, never opened).
"""

from __future__ import annotations

import contextlib
import email.policy
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time, timedelta
from email.message import EmailMessage
from email.parser import BytesParser

from pipeline.errors import FieldError, NotFound, ValidationFailed
from pipeline.mime_bounds import header_refusal, parse_problem
from storage import message_log as store
from storage.db import Database
from storage.message_log import EmailFilter
from storage.models import EmailStatus
from storage.pagination import is_valid_cursor
from storage.retention import id_bound

SOURCES = ("api", "smtp", "campaign", "workflow")
"""`emails.source`: the API's /v1/send, the SMTP relay, a campaign, a workflow's send step."""
STATUSES = tuple(status.value for status in EmailStatus)
RECIPIENT_MATCHES = ("prefix", "exact")
SUBJECT_MATCHES = ("contains", "prefix")
MAX_SEARCH = 320
"""The longest recipient or subject search (an address is at most 320 characters)."""
PAGE_SIZES = (25, 50, 100)
DEFAULT_PAGE_SIZE = 50
HEADERS_SHOWN = 200
HEADER_VALUE_SHOWN = 2000
DECODED_HEADER_CHARS = 500
"""A header value longer than this is shown as written (unfolded), not decoded: policy.default's parser of an
address field is quadratic in its quotes (16 KB of `"` in a To took 2.7 s, 64 KB 32 s); at this length a value
costs at most a few milliseconds."""


@dataclass
class LogSearch:
    """A checked search of the log: `wanted` for the query, `shown` the values to put back in the form."""

    wanted: EmailFilter
    limit: int
    cursor: str | None
    shown: dict[str, str]


def _text(query: Mapping[str, str], name: str, errors: list[FieldError], limit: int = MAX_SEARCH) -> str:
    value = query.get(name, "").strip()
    if len(value) > limit:
        errors.append(FieldError(name, f"At most {limit} characters", "too_big"))
        return ""
    if any(ord(ch) < 32 or ord(ch) == 127 for ch in value):
        errors.append(FieldError(name, "Control characters are not allowed", "invalid_string"))
        return ""
    return value


def _choice(query: Mapping[str, str], name: str, allowed: tuple[str, ...], errors: list[FieldError],
            default: str = "") -> str:
    value = query.get(name, "").strip() or default
    if value and value not in allowed:
        errors.append(FieldError(name, "Not one of the listed values", "invalid_enum_value"))
        return default
    return value


def _day(query: Mapping[str, str], name: str, errors: list[FieldError]) -> date | None:
    value = query.get(name, "").strip()
    if not value:
        return None
    try:
        if len(value) != 10:
            raise ValueError(value)
        return date.fromisoformat(value)
    except ValueError:
        errors.append(FieldError(name, "A date as YYYY-MM-DD", "invalid_date"))
        return None


def _day_start(day: date) -> datetime:
    return datetime.combine(day, time(), UTC)


def log_search(query: Mapping[str, str]) -> LogSearch:
    """Check the log's query string: recipient (+ `match` prefix|exact), subject (+ `subjectMatch`
    contains|prefix), status, source, from/to (dates, UTC, both inclusive), limit, cursor."""
    errors: list[FieldError] = []
    recipient = _text(query, "recipient", errors).lower()
    match = _choice(query, "match", RECIPIENT_MATCHES, errors, "prefix")
    subject = _text(query, "subject", errors)
    subject_match = _choice(query, "subjectMatch", SUBJECT_MATCHES, errors, "contains")
    status = _choice(query, "status", STATUSES, errors)
    source = _choice(query, "source", SOURCES, errors)
    first, last = _day(query, "from", errors), _day(query, "to", errors)
    if first and last and first > last:
        errors.append(FieldError("to", "The end date is before the start date", "invalid_date"))
    limit_text = query.get("limit", "").strip() or str(DEFAULT_PAGE_SIZE)
    if limit_text not in {str(size) for size in PAGE_SIZES}:
        errors.append(FieldError("limit", f"One of: {', '.join(map(str, PAGE_SIZES))}", "invalid_enum_value"))
        limit_text = str(DEFAULT_PAGE_SIZE)
    cursor = query.get("cursor", "").strip() or None
    if cursor is not None and not is_valid_cursor(cursor):
        errors.append(FieldError("cursor", "Not a page of this list: start again from the first page",
                                 "invalid_string"))
        cursor = None
    shown = {"recipient": recipient, "match": match, "subject": subject, "subjectMatch": subject_match,
             "status": status, "source": source, "from": first.isoformat() if first else "",
             "to": last.isoformat() if last else "", "limit": limit_text}
    if errors:
        raise ValidationFailed(errors, "Some search fields are not valid")
    wanted = EmailFilter(recipient=recipient or None, recipient_exact=match == "exact", subject=subject or None,
                         subject_contains=subject_match == "contains", status=status or None, source=source or None,
                         from_id=id_bound(_day_start(first)) if first else None,
                         until_id=id_bound(_day_start(last + timedelta(days=1))) if last else None)
    return LogSearch(wanted, int(limit_text), cursor, shown)


def suppression_search(query: Mapping[str, str]) -> tuple[str, str | None, dict[str, str]]:
    """(the email prefix searched, the cursor, the values to show in the form)."""
    errors: list[FieldError] = []
    prefix = _text(query, "email", errors).lower()
    cursor = query.get("cursor", "").strip() or None
    if cursor is not None and not is_valid_cursor(cursor):
        errors.append(FieldError("cursor", "Not a page of this list: start again from the first page",
                                 "invalid_string"))
    if errors:
        raise ValidationFailed(errors, "Some search fields are not valid")
    return prefix, cursor, {"email": prefix}


async def lift_suppression(db: Database, project_id: str, suppression_id: str) -> str:
    """Take an address off the project's suppression list (mail to it is sent again); the address."""
    lifted = await db.write(lambda s: store.delete_suppression(s, project_id, suppression_id))
    if lifted is None:
        raise NotFound("No such suppression: it may have been removed already")
    return lifted


@dataclass
class Attachment:
    filename: str
    content_type: str
    size: int


@dataclass
class MessageView:
    """A stored MIME message as the email's page shows it."""

    headers: list[tuple[str, str]] = field(default_factory=list)
    html: str | None = None
    text: str | None = None
    attachments: list[Attachment] = field(default_factory=list)
    problem: str | None = None
    """The message could not be read whole (its parts are shown as far as they could be)."""


def _part_text(part: EmailMessage) -> str:
    try:
        return str(part.get_content())
    except (LookupError, UnicodeError, AssertionError, ValueError):
        payload = part.get_payload(decode=True)
        return payload.decode("utf-8", "replace") if isinstance(payload, bytes) else ""


def read_message(raw: bytes) -> MessageView:
    """Parse a stored message: headers (unfolded, cut at `HEADER_VALUE_SHOWN`), the HTML and text bodies,
    and the attachments' names, types and sizes."""
    problem = parse_problem(raw) or header_refusal(raw)
    if problem is not None:
        return MessageView(problem=f"The message is not shown: {problem.removeprefix('552 5.3.4 ')}")
    view = MessageView()
    message = BytesParser(policy=email.policy.default).parsebytes(raw)
    assert isinstance(message, EmailMessage)
    for name, value in list(message.raw_items())[:HEADERS_SHOWN]:
        shown = str(value)
        if len(shown) <= DECODED_HEADER_CHARS:
            with contextlib.suppress(Exception):  # a header the policy cannot decode stays as written
                shown = str(message.policy.header_fetch_parse(name, value))
        view.headers.append((name, " ".join(shown.split())[:HEADER_VALUE_SHOWN]))
    try:
        html = message.get_body(preferencelist=("html",))
        text = message.get_body(preferencelist=("plain",))
        view.html = _part_text(html) if isinstance(html, EmailMessage) else None
        view.text = _part_text(text) if isinstance(text, EmailMessage) else None
        for part in message.walk():
            if part.is_multipart() or part is html or part is text:
                continue
            payload = part.get_payload(decode=True)
            view.attachments.append(Attachment(str(part.get_filename() or "(no name)"), part.get_content_type(),
                                               len(payload) if isinstance(payload, bytes) else 0))
    except Exception as exc:  # a malformed structure: show what was read
        view.problem = f"The message's structure could not be read whole ({type(exc).__name__})"
    return view
