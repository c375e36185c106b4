"""Emails, their content, the outbox, suppressions and idempotency records.

The outbox lease is the due time itself: a claim moves `due_at` to now + lease, so a row whose
dispatcher died becomes due again when the lease runs out, with no separate sweeper.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime, timedelta
from email.message import Message
from typing import Any

from sqlalchemy import bindparam, func, literal_column, null, select
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.orm import Session

from storage import bulk, fastpath
from storage.batch import write_at_commit
from storage.claims import DueClaim
from storage.domains import sender_domain
from storage.models import (
    Content,
    Domain,
    Email,
    EmailStatus,
    IdempotencyRecord,
    OutboxItem,
    Suppression,
    new_id,
    utcnow,
)
from storage.pagination import CURSOR_PATTERN
from storage.system import count_settled

_CONTENT = Content.__table__
_EMAIL = Email.__table__
_OUTBOX = OutboxItem.__table__
# Built once: every accepted email runs these three, and building a statement costs more than SQLite.
_INSERT_CONTENT = _CONTENT.insert()
_INSERT_EMAIL = _EMAIL.insert()
_INSERT_OUTBOX = _OUTBOX.insert()


def insert_content(session: Session, project_id: str, raw: bytes) -> str:
    content_id = new_id()
    write_at_commit(session, _INSERT_CONTENT, {"id": content_id, "project_id": project_id, "raw": raw,
                                                "deferred": False, "created_at": utcnow()})
    return content_id


def insert_deferred_content(session: Session, project_id: str, spec: bytes) -> str:
    """A message spec that emails are composed from when sent (`pipeline.deferred`), written now: the
    emails that share it may be written in bulk right after (`insert_deferred_emails`)."""
    content_id = new_id()
    session.connection().execute(_INSERT_CONTENT, {"id": content_id, "project_id": project_id, "raw": spec,
                                                   "deferred": True, "created_at": utcnow()})
    return content_id


SKIPPED_UNSUBSCRIBED = "marketing mail to a contact who is not subscribed"
MESSAGE_ID_LIMIT = 255
"""`emails.message_id` holds at most this many characters."""


def message_id_header(headers: Message) -> str | None:
    """The Message-ID a message carries, unfolded (None: none, or an empty one)."""
    value = "".join(str(headers.get("Message-ID", "")).splitlines()).strip()
    return value or None


def generated_message_id(email_id: str, sender: str) -> str:
    """The Message-ID an email gets when it is accepted without one: its own id at the sender's domain.
    It is stored with the email and sent on every attempt, so a copy sent again after a crash carries
    the same Message-ID as the first and a receiver can tell it is a duplicate."""
    return f"<{email_id}@{message_id_domain(sender)}>"


_GENERATED_MESSAGE_ID = re.compile(rf"<({CURSOR_PATTERN.pattern})@")


def generated_email_id(message_id: str) -> str | None:
    """The email id a Message-ID made by `generated_message_id` holds; None for any other Message-ID."""
    made = _GENERATED_MESSAGE_ID.match(message_id)
    return None if made is None else made[1]


def message_id_domain(sender: str) -> str:
    """The right side of the Message-IDs generated for `sender`: its domain, cut from the left where the
    Message-ID would not fit `MESSAGE_ID_LIMIT` beside an email id (a domain name may be 253 characters)."""
    room = MESSAGE_ID_LIMIT - len("<@>") - len(new_id())
    return sender_domain(sender)[-room:].lstrip(".")


def insert_email(session: Session, project_id: str, contact_id: str | None, content_id: str, recipient: str,
                 sender: str, subject: str, source: str, envelope_sender: str | None = None,
                 skipped: bool = False, variables: dict[str, Any] | None = None, track_opens: bool = False,
                 track_clicks: bool = False, message_id: str | None = None) -> str:
    """One email record and its outbox row, due now (written at commit, with the batch's others); a
    `skipped` email is recorded as SKIPPED, with no outbox row. `variables`: a deferred email's own
    template variables. `track_opens` / `track_clicks`: its tracking choice (`pipeline.tracking.links`).
    `message_id`: the Message-ID the message already carries (SMTP); None gives it one."""
    email_id, now = new_id(), utcnow()
    write_at_commit(session, _INSERT_EMAIL, {"id": email_id, "project_id": project_id, "contact_id": contact_id,
                                              "content_id": content_id, "recipient": recipient, "sender": sender,
                                              "envelope_sender": envelope_sender, "subject": subject,
                                              "source": source, "variables": variables,
                                              "message_id": message_id or generated_message_id(email_id, sender),
                                              "status": EmailStatus.SKIPPED if skipped else EmailStatus.QUEUED,
                                              "error": SKIPPED_UNSUBSCRIBED if skipped else None,
                                              "created_at": now, "track_opens": track_opens,
                                              "track_clicks": track_clicks})
    if not skipped:
        write_at_commit(session, _INSERT_OUTBOX, {"id": new_id(), "email_id": email_id, "due_at": now,
                                                   "attempts": 0})
    return email_id


@dataclass
class DeferredEmail:
    """One email of `insert_deferred_emails`."""

    contact_id: str
    recipient: str
    variables: dict[str, Any] | None
    skipped: bool


_EMAIL_COLUMNS = [("id", "text"), ("project_id", "text"), ("contact_id", "text"), ("content_id", "text"),
                  ("recipient", "text"), ("sender", "text"), ("envelope_sender", "text"), ("subject", "text"),
                  ("source", "text"), ("variables", "json"), ("status", "text"), ("error", "text"),
                  ("created_at", "time"), ("track_opens", "bool"), ("track_clicks", "bool"), ("message_id", "text")]
_OUTBOX_COLUMNS = [("id", "text"), ("email_id", "text"), ("due_at", "time"), ("attempts", "int")]


def insert_deferred_emails(session: Session, project_id: str, content_id: str, sender: str,
                           envelope_sender: str, subject: str, source: str, emails: list[DeferredEmail],
                           track_opens: bool = False, track_clicks: bool = False) -> list[str]:
    """What `insert_email` writes, for many emails sharing one deferred content (and one tracking choice),
    in two statements (`storage.bulk`); returns their ids in order."""
    now = utcnow()
    ids = [new_id() for _ in emails]
    bulk.insert_rows(session, _EMAIL, _EMAIL_COLUMNS, [
        [email_id, project_id, email.contact_id, content_id, email.recipient, sender, envelope_sender, subject,
         source, email.variables, EmailStatus.SKIPPED if email.skipped else EmailStatus.QUEUED,
         SKIPPED_UNSUBSCRIBED if email.skipped else None, now, track_opens, track_clicks,
         generated_message_id(email_id, sender)]
        for email_id, email in zip(ids, emails, strict=True)])
    bulk.insert_rows(session, _OUTBOX, _OUTBOX_COLUMNS, [
        [new_id(), email_id, now, 0] for email_id, email in zip(ids, emails, strict=True) if not email.skipped])
    return ids


def get_email(session: Session, project_id: str, email_id: str) -> Email | None:
    stmt = select(Email).where(Email.project_id == project_id, Email.id == email_id)
    return session.execute(stmt).scalar_one_or_none()


def list_emails(session: Session, project_id: str) -> list[Email]:
    return list(session.execute(select(Email).where(Email.project_id == project_id).order_by(Email.id)).scalars())


@dataclass(kw_only=True)
class Claimed:
    """An outbox row a dispatcher leased, with what sending it needs. Built by name from `claim_due`'s
    labelled columns; keyword-only without defaults, so a field the query does not select fails at once."""

    outbox_id: str
    attempts: int
    email_id: str
    project_id: str
    contact_id: str | None
    recipient: str
    sender: str
    envelope_sender: str | None
    """The Return-Path to deliver with; None: the From address (`sender`). A VERP address replaces it when the
    sender's domain has a verified return path (`Dispatcher.envelope_sender`)."""
    source: str
    """api, smtp, campaign, workflow...: mail relayed over SMTP keeps its client's MAIL FROM unless its project
    chose VERP for it."""
    raw: bytes
    suppressed: bool
    content_id: str
    deferred: bool
    """`raw` is a message spec (a campaign's, a workflow step's), composed for this recipient when sent."""
    variables: dict[str, Any] | None
    """A deferred email's own template variables (`Email.variables`)."""
    track_opens: bool
    track_clicks: bool
    """The email's tracking choice: the dispatcher adds the open pixel / click redirects (`Email.track_*`)."""
    message_id: str | None = None
    """Given when the email was accepted (None: an email queued before Message-IDs were stored)."""
    campaign_id: str | None = None
    """The campaign whose live send this is: the dispatcher sends it only while the campaign is not cancelled."""


_DUE = DueClaim(select(_OUTBOX.c.id).where(_OUTBOX.c.due_at <= bindparam("now"))
                .order_by(_OUTBOX.c.priority, _OUTBOX.c.due_at).limit(bindparam("limit")), lease=_OUTBOX)


def claim_due(session: Session, worker: str, limit: int, lease_seconds: float, postgres: bool) -> list[Claimed]:
    """Take up to `limit` due rows for `worker`, leasing them for `lease_seconds`: the lowest priority
    first (transactional mail before campaign mail), then the longest due."""
    now = utcnow()
    ids = [row.id for row in _DUE.claim(session, now, limit, postgres, now + timedelta(seconds=lease_seconds),
                                        worker)]
    if not ids:
        return []
    conn = session.connection()
    suppressed = select(Suppression.id).where(Suppression.project_id == _EMAIL.c.project_id,
                                              Suppression.email == _EMAIL.c.recipient).exists()
    rows = conn.execute(
        select(_OUTBOX.c.id.label("outbox_id"), _OUTBOX.c.attempts, _EMAIL.c.id.label("email_id"),
               _EMAIL.c.project_id, _EMAIL.c.contact_id, _EMAIL.c.recipient, _EMAIL.c.sender,
               _EMAIL.c.envelope_sender, _EMAIL.c.source, _CONTENT.c.raw, suppressed.label("suppressed"),
               _CONTENT.c.id.label("content_id"), _CONTENT.c.deferred, _EMAIL.c.variables, _EMAIL.c.track_opens,
               _EMAIL.c.track_clicks, _EMAIL.c.message_id, _OUTBOX.c.campaign_id)
        .join(_EMAIL, _EMAIL.c.id == _OUTBOX.c.email_id).join(_CONTENT, _CONTENT.c.id == _EMAIL.c.content_id)
        .where(_OUTBOX.c.id.in_(ids)).order_by(_OUTBOX.c.priority, _OUTBOX.c.due_at)).mappings()
    return [Claimed(**row) for row in rows]


_MARK = _EMAIL.update().where(_EMAIL.c.id == bindparam("email_id"))
_SETTLE = _OUTBOX.delete().where(_OUTBOX.c.id == bindparam("outbox_id"))
_RETRY = _OUTBOX.update().where(_OUTBOX.c.id == bindparam("outbox_id")).values(
    due_at=bindparam("retry_at"), attempts=_OUTBOX.c.attempts + literal_column("1"),
    last_error=bindparam("retry_error"), claimed_by=null())
"""The dispatcher's outcome statements, built once and run by `storage.fastpath` (two for every message it settles:
building and executing them through SQLAlchemy cost the dispatcher a sixth of its time, sending 100 KB messages
back to back)."""


def mark_sent(session: Session, outbox_id: str, email_id: str, message_id: str, transport_id: str,
              envelope_sender: str | None = None) -> None:
    """`envelope_sender`: the MAIL FROM it went out with, when not the one it was accepted with (VERP)."""
    now = utcnow()
    changed = {"envelope_sender": envelope_sender} if envelope_sender is not None else {}
    fastpath.execute(session, _MARK, {"email_id": email_id, "status": EmailStatus.SENT, "message_id": message_id,
                                      "transport_id": transport_id, "sent_at": now, "error": None, **changed})
    fastpath.execute(session, _SETTLE, {"outbox_id": outbox_id})
    count_settled(session, now, sent=True)


def mark_failed(session: Session, outbox_id: str, email_id: str, status: EmailStatus, error: str) -> None:
    fastpath.execute(session, _MARK, {"email_id": email_id, "status": status, "error": error[:2000]})
    fastpath.execute(session, _SETTLE, {"outbox_id": outbox_id})
    if status in (EmailStatus.BOUNCED, EmailStatus.FAILED):
        count_settled(session, utcnow(), sent=False)


def schedule_retry(session: Session, outbox_id: str, due_at: datetime, error: str) -> None:
    fastpath.execute(session, _RETRY, {"outbox_id": outbox_id, "retry_at": due_at, "retry_error": error[:2000]})


@dataclass
class OutboxSummary:
    depth: dict[int, int]
    """Rows waiting, by priority."""
    oldest_due: datetime | None
    """The earliest due time among the rows due now (None: none is due)."""


def outbox_summary(session: Session, now: datetime) -> OutboxSummary:
    """For /metrics: a count per priority (an index-only count) and the longest-waiting due row (an index
    probe per priority)."""
    conn = session.connection()
    depth = {priority: count for priority, count in conn.execute(
        select(_OUTBOX.c.priority, func.count()).group_by(_OUTBOX.c.priority))}
    firsts = [conn.execute(select(func.min(_OUTBOX.c.due_at)).where(_OUTBOX.c.priority == priority,
                                                                    _OUTBOX.c.due_at <= now)).scalar()
              for priority in depth]
    return OutboxSummary(depth, min((first for first in firsts if first is not None), default=None))


def outbox_rows(session: Session) -> list[OutboxItem]:
    return list(session.execute(select(OutboxItem).order_by(OutboxItem.id)).scalars())


_SUPPRESSION = Suppression.__table__
_SUPPRESS = {
    "postgresql": pg_insert(_SUPPRESSION).on_conflict_do_nothing(index_elements=["project_id", "email"]),
    "sqlite": sqlite_insert(_SUPPRESSION).on_conflict_do_nothing(index_elements=["project_id", "email"]),
}


def add_suppression(session: Session, project_id: str, email: str, reason: str, email_id: str | None = None) -> bool:
    """Put the address on the project's suppression list, naming the email whose bounce or complaint caused
    it; False when it already was (also when another transaction put it there meanwhile: the insert does
    nothing on conflict)."""
    result = session.connection().execute(_SUPPRESS[session.get_bind().dialect.name], {
        "id": new_id(), "project_id": project_id, "email": email, "reason": reason[:2000], "email_id": email_id,
        "created_at": utcnow()})
    return result.rowcount == 1


def domain_key(session: Session, project_id: str, name: str) -> Domain | None:
    stmt = select(Domain).where(Domain.project_id == project_id, Domain.name == name)
    return session.execute(stmt).scalar_one_or_none()


def find_idempotent(session: Session, project_id: str, key: str, since: datetime) -> IdempotencyRecord | None:
    stmt = select(IdempotencyRecord).where(IdempotencyRecord.project_id == project_id, IdempotencyRecord.key == key)
    record = session.execute(stmt).scalar_one_or_none()
    if record is not None and record.created_at < since:
        session.delete(record)
        session.flush()
        return None
    return record


def save_idempotent(session: Session, project_id: str, key: str, digest: str, response: dict[str, Any]) -> None:
    session.add(IdempotencyRecord(project_id=project_id, key=key, request_digest=digest, response=response))
    session.flush()
