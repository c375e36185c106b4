"""Delivery feedback queries: the SNS messages already applied, the emails a notification is about (by the
id their transport gave them), their status, and the feedback events already recorded against one."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import bindparam, delete, func, select, text
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.orm import Session

from storage.emails import generated_email_id
from storage.models import FOREIGN_MESSAGE_ID, AppliedSnsMessage, Email, EmailStatus, Event, utcnow

_APPLIED = AppliedSnsMessage.__table__
_EMAIL = Email.__table__
_EVENT = Event.__table__
_CLAIM = {
    "postgresql": pg_insert(_APPLIED).on_conflict_do_nothing(index_elements=["message_id"]),
    "sqlite": sqlite_insert(_APPLIED).on_conflict_do_nothing(index_elements=["message_id"]),
}
_IS_APPLIED = select(_APPLIED.c.message_id).where(_APPLIED.c.message_id == bindparam("m"))
_BY_TRANSPORT_ID = (select(_EMAIL.c.id, _EMAIL.c.project_id, _EMAIL.c.contact_id, _EMAIL.c.recipient,
                           _EMAIL.c.status)
                    .where(_EMAIL.c.transport_id == bindparam("t")).order_by(_EMAIL.c.id))
_BY_TRANSPORT_ID_LOCKED = _BY_TRANSPORT_ID.with_for_update()
_BY_ID = select(_EMAIL.c.id, _EMAIL.c.project_id, _EMAIL.c.contact_id, _EMAIL.c.recipient,
                _EMAIL.c.status).where(_EMAIL.c.id == bindparam("e"))
_BY_FOREIGN_MESSAGE_ID = (select(_EMAIL.c.id).where(_EMAIL.c.project_id == bindparam("p"),
                                                    _EMAIL.c.message_id == bindparam("m"), text(FOREIGN_MESSAGE_ID))
                          .order_by(_EMAIL.c.id).limit(bindparam("limit")))
_BY_GENERATED_MESSAGE_ID = select(_EMAIL.c.id).where(_EMAIL.c.id == bindparam("e"),
                                                     _EMAIL.c.project_id == bindparam("p"),
                                                     _EMAIL.c.message_id == bindparam("m"))
_EVENT_COUNT = (select(func.count()).select_from(_EVENT)
                .where(_EVENT.c.email_id == bindparam("e"), _EVENT.c.name == bindparam("n")))


def claim_message(session: Session, message_id: str, topic_arn: str, message_type: str) -> bool:
    """Record the SNS message as applied in this transaction; False when it already was. On PostgreSQL a
    transaction applying the same message at the same moment is waited for, so one of the two applies it."""
    stmt = _CLAIM[session.get_bind().dialect.name]
    result = session.connection().execute(stmt, {"message_id": message_id, "topic_arn": topic_arn,
                                                 "type": message_type, "received_at": utcnow()})
    return result.rowcount == 1


def is_applied(session: Session, message_id: str) -> bool:
    return session.connection().execute(_IS_APPLIED, {"m": message_id}).first() is not None


def prune_applied(session: Session, before: datetime, limit: int) -> int:
    """Forget up to `limit` applied messages received before `before` (a message that old is refused anyway)."""
    oldest = select(_APPLIED.c.message_id).where(_APPLIED.c.received_at < before).limit(limit)
    return session.connection().execute(delete(_APPLIED).where(_APPLIED.c.message_id.in_(oldest))).rowcount


@dataclass
class FeedbackEmail:
    """An email a notification is about."""

    id: str
    project_id: str
    contact_id: str | None
    recipient: str
    status: str


def emails_by_transport_id(session: Session, transport_id: str) -> list[FeedbackEmail]:
    """The emails the transport sent as `transport_id` (one per SES message: the dispatcher sends each email
    on its own), locked on PostgreSQL so that notifications about one email are applied one after another."""
    postgres = session.get_bind().dialect.name == "postgresql"
    rows = session.connection().execute(_BY_TRANSPORT_ID_LOCKED if postgres else _BY_TRANSPORT_ID,
                                        {"t": transport_id})
    return [FeedbackEmail(*row) for row in rows]


def email_by_id(session: Session, email_id: str) -> FeedbackEmail | None:
    """The email a report names (by its VERP token), locked on PostgreSQL as `emails_by_transport_id` locks."""
    postgres = session.get_bind().dialect.name == "postgresql"
    row = session.connection().execute(_BY_ID.with_for_update() if postgres else _BY_ID, {"e": email_id}).first()
    return None if row is None else FeedbackEmail(*row)


def email_ids_by_message_id(session: Session, project_id: str, message_id: str, limit: int) -> list[str]:
    """The project's emails sent with the Message-ID `message_id`, at most `limit` of them in id order: the one
    whose id it holds when plunkd made it, and those relayed with it (ix_emails_message_id, `FOREIGN_MESSAGE_ID`)."""
    connection = session.connection()
    found = list(connection.execute(_BY_FOREIGN_MESSAGE_ID, {"p": project_id, "m": message_id,
                                                             "limit": limit}).scalars())
    email_id = generated_email_id(message_id)
    if email_id is not None:
        found += connection.execute(_BY_GENERATED_MESSAGE_ID, {"e": email_id, "p": project_id,
                                                               "m": message_id}).scalars()
    return sorted(found)[:limit]


def set_status(session: Session, email_id: str, status: EmailStatus, error: str | None = None,
               only_from: tuple[str, ...] | None = None) -> bool:
    """Set the email's status (and `error`, when given); with `only_from`, only if its status is one of
    those. True when the row changed."""
    stmt = _EMAIL.update().where(_EMAIL.c.id == email_id)
    if only_from is not None:
        stmt = stmt.where(_EMAIL.c.status.in_(only_from))
    values: dict[str, str] = {"status": status}
    if error is not None:
        values["error"] = error[:2000]
    return session.connection().execute(stmt.values(**values)).rowcount == 1


def count_events(session: Session, email_id: str, name: str) -> int:
    """How many `name` events were recorded against the email (ix_events_email_id)."""
    return session.connection().execute(_EVENT_COUNT, {"e": email_id, "n": name}).scalar_one()
