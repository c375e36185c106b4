"""The one send path. `POST /v1/send` and the SMTP relay both call `submit`, inside a write
transaction, so an email leaves the same records whichever way it came in."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from email.header import decode_header, make_header
from email.message import Message
from email.parser import BytesHeaderParser
from email.policy import compat32
from typing import Any

from sqlalchemy.orm import Session

from core.metrics import EMAILS_ACCEPTED, count_at_commit
from pipeline.compose import SUBMISSION_STRIPPED_HEADERS, MessageSpec
from pipeline.contacts import upsert_contact
from pipeline.deferred import insert_spec
from pipeline.domains import require_verified_sender
from pipeline.errors import Conflict, FieldError, ValidationFailed
from pipeline.mime_bounds import header_end
from pipeline.tracking.links import Tracking, tracking_for
from storage import emails as email_store
from storage.contacts import ContactWork

STRIPPED_FIELD = re.compile(rb"^(?:bcc|" + b"|".join(
    [re.escape(name.encode()) for rule in SUBMISSION_STRIPPED_HEADERS for name in sorted(rule.names)]
    + [re.escape(prefix.encode()) + rb"[!-9;-~]*"  # the prefix, then the rest of a field name
       for rule in SUBMISSION_STRIPPED_HEADERS for prefix in rule.prefixes]) + rb")[ \t]*:", re.I)
"""The first line of a field `strip_fields` removes: Bcc, and `SUBMISSION_STRIPPED_HEADERS`."""
LIGHT_RECIPIENTS = 10
LIGHT_BYTES = 64 * 1024


@dataclass
class Submission:
    project_id: str
    source: str  # "api" or "smtp"
    sender: str  # the From address; its domain must be verified
    recipients: list[str]  # lower-cased, de-duplicated by `submit`
    subscribed: bool | None = None
    variables: dict[str, Any] | None = None
    raw: bytes | None = None
    """SMTP: the message exactly as the client wrote it (Bcc is stripped here)."""
    compose: Callable[[str, dict[str, Any]], bytes] | None = None
    """API: builds one recipient's message from (address, template variables)."""
    subject: str = ""
    size: int = 0
    """API: about how big each composed message will be (body and attachments)."""
    envelope_sender: str | None = None
    """SMTP: the client's MAIL FROM, the Return-Path of the delivery (None: the From address, see
    `envelope_sender_for`); it must be on a verified domain too."""
    marketing: bool = False
    """Marketing mail (a MARKETING template, a campaign's test copy): a recipient whose contact is not
    subscribed gets an email record marked SKIPPED and nothing is queued for them."""
    tracking: Tracking | None = None
    """Open and click tracking as the send asked (None, or a None field: the project's default for
    marketing mail when `marketing`, else for transactional mail; see `pipeline.tracking.links`)."""
    test_copy: bool = False
    """A campaign's test copy: sent and recorded as an email of no contact (contact_id NULL), so the
    audience is left as it was: no contact created or changed, no contact events. Rendered without
    contact data (`plunk_id` empty: its unsubscribe link names no contact)."""

    @property
    def light(self) -> bool:
        """Small enough for the write batcher to run on the event loop (see `storage.batch`)."""
        size = len(self.raw) if self.raw is not None else self.size
        return len(self.recipients) <= LIGHT_RECIPIENTS and size <= LIGHT_BYTES

    def as_work(self, fn: Callable[[Session], Any]) -> ContactWork:
        """`fn`, which submits this, as a write that names the contacts it upserts (batched: `ContactWork`)."""
        keys = [] if self.test_copy else [(self.project_id, r.lower()) for r in self.recipients]
        return ContactWork(fn, keys)


@dataclass
class Queued:
    contact_id: str | None
    email: str
    email_id: str


def strip_fields(raw: bytes) -> bytes:
    """Remove Bcc fields (the recipients must not see them) and the fields a submitting client is not
    trusted with (`SUBMISSION_STRIPPED_HEADERS`: authentication results, ARC sets, SES instructions), each
    with its folded lines; keep every other byte as written."""
    split = header_end(raw)
    kept: list[bytes] = []
    dropping = False
    for line in raw[:split].splitlines(keepends=True):
        if line[:1] in (b" ", b"\t") and dropping:
            continue
        dropping = bool(STRIPPED_FIELD.match(line))
        if not dropping:
            kept.append(line)
    return b"".join(kept) + raw[split:]


def parse_raw_headers(raw: bytes) -> Message:
    """The header block of a client's message; compat32 keeps this cheap and never raises on odd input."""
    return BytesHeaderParser(policy=compat32).parsebytes(raw[:header_end(raw)], headersonly=True)


def decoded_subject(headers: Message) -> str:
    value = headers.get("Subject", "")
    try:
        return str(make_header(decode_header(str(value))))[:998]
    except (UnicodeError, LookupError, ValueError):
        return str(value)[:998]


def envelope_sender_for(sender: str, mail_from: str | None = None) -> str:
    """The envelope sender (Return-Path) an email is delivered with, recorded on its row whatever path
    it came in by: the SMTP client's MAIL FROM when it gave one, else the From address."""
    return mail_from or sender


def client_message_id(headers: Message) -> str | None:
    """The Message-ID of a client's message, kept and recorded as it is (None: it has none, and each
    email gets one of its own); one longer than the record holds is refused."""
    message_id = email_store.message_id_header(headers)
    if message_id is not None and len(message_id) > email_store.MESSAGE_ID_LIMIT:
        raise ValidationFailed(
            [FieldError("Message-ID", f"at most {email_store.MESSAGE_ID_LIMIT} characters", "too_long")],
            f"The Message-ID header is longer than {email_store.MESSAGE_ID_LIMIT} characters",
            "Send a shorter Message-ID, or none: plunkd then gives the message one.")
    return message_id


def submit(session: Session, submission: Submission) -> list[Queued]:
    """Check the senders, upsert each recipient, write one email + outbox row per recipient. Each email
    is given its Message-ID here, once (`storage.emails.generated_message_id`), or keeps the one its
    message carries (SMTP); every attempt to deliver it sends that one."""
    require_verified_sender(session, submission.project_id, submission.sender)
    if submission.envelope_sender is not None:
        require_verified_sender(session, submission.project_id, submission.envelope_sender)
    raw = strip_fields(submission.raw) if submission.raw is not None else None
    tracking = tracking_for(session, submission.project_id, submission.marketing, submission.tracking)
    subject, message_id = submission.subject, None
    if raw is not None:
        headers = parse_raw_headers(raw)
        subject = subject or decoded_subject(headers)
        message_id = client_message_id(headers)
    envelope_sender = envelope_sender_for(submission.sender, submission.envelope_sender)
    contents: dict[bytes, str] = {}
    queued: list[Queued] = []
    for address in dict.fromkeys(r.lower() for r in submission.recipients):
        if submission.test_copy:
            contact_id, contact_data, subscribed = None, {}, True
        else:
            contact, _, _ = upsert_contact(session, submission.project_id, address, submission.subscribed,
                                           default_subscribed=False, only_subscribe=True)
            contact_id, contact_data, subscribed = contact.id, contact.data or {}, contact.subscribed
        if raw is not None:
            message = raw
        else:
            assert submission.compose is not None
            variables = {**contact_data, **(submission.variables or {}),
                         "plunk_id": contact_id or "", "plunk_email": address}
            message = submission.compose(address, variables)
        digest = hashlib.sha256(message).digest()
        if digest not in contents:
            contents[digest] = email_store.insert_content(session, submission.project_id, message)
        skipped = submission.marketing and not subscribed
        email_id = email_store.insert_email(session, submission.project_id, contact_id, contents[digest], address,
                                            submission.sender, subject, submission.source,
                                            envelope_sender, skipped=skipped,
                                            track_opens=bool(tracking.opens), track_clicks=bool(tracking.clicks),
                                            message_id=message_id)
        queued.append(Queued(contact_id, address, email_id))
        if not skipped:
            count_at_commit(session, EMAILS_ACCEPTED.labels(submission.source))
    return queued


@dataclass
class DeferredRecipient:
    """One recipient of `submit_deferred`: a contact as read in this transaction, and the variables of
    their email (laid over the contact's data when it is composed)."""

    contact_id: str
    email: str
    subscribed: bool
    variables: dict[str, Any] | None = None


def submit_deferred(session: Session, project_id: str, source: str, spec: MessageSpec,
                    recipients: list[DeferredRecipient]) -> list[Queued]:
    """The send path for mail composed when it is sent (`pipeline.deferred`): check the sender once, store
    the spec once, and write one email + outbox row per recipient (no MIME). The marketing rule is
    `submit`'s: marketing mail to a contact who is not subscribed is recorded as SKIPPED, not queued."""
    require_verified_sender(session, project_id, spec.from_email)
    content_id = insert_spec(session, project_id, spec)
    marketing = spec.links is not None
    emails = [email_store.DeferredEmail(r.contact_id, r.email, r.variables or None,
                                        skipped=marketing and not r.subscribed) for r in recipients]
    tracking = tracking_for(session, project_id, marketing)
    ids = email_store.insert_deferred_emails(session, project_id, content_id, spec.from_email,
                                             envelope_sender_for(spec.from_email), spec.subject, source, emails,
                                             bool(tracking.opens), bool(tracking.clicks))
    count_at_commit(session, EMAILS_ACCEPTED.labels(source), sum(not email.skipped for email in emails))
    return [Queued(email.contact_id, email.recipient, email_id) for email, email_id in zip(emails, ids, strict=True)]


def run_idempotent(session: Session, project_id: str, key: str, digest: str, keep_hours: int,
                   produce: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """Idempotency-Key, for HTTP and SMTP alike: the same key and request give the first reply
    again; the same key with another request is a Conflict; keys are kept `keep_hours`."""
    since = datetime.now(UTC) - timedelta(hours=keep_hours)
    previous = email_store.find_idempotent(session, project_id, key, since)
    if previous is not None:
        if previous.request_digest != digest:
            raise Conflict("Idempotency-Key was already used with a different request",
                           "Use a new Idempotency-Key for a different email.")
        return previous.response
    reply = produce()
    email_store.save_idempotent(session, project_id, key, digest, reply)
    return reply


def submit_once(session: Session, submission: Submission, key: str, digest: str, keep_hours: int) -> list[str]:
    """`submit` under an Idempotency-Key (the SMTP form): returns the email ids of the first submission."""
    reply = run_idempotent(session, submission.project_id, key, digest, keep_hours,
                           lambda: {"emails": [q.email_id for q in submit(session, submission)]})
    return reply["emails"]
