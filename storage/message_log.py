"""The dashboard's message log and suppression list: their queries, each a range of one index.

The log is newest first by id (UUIDv7), paged by cursor (the last id shown). Recipient, status and source
each have a (project_id, <column>, id) index (migration 0013), and a date range is a range of ids
(`storage.retention.id_bound`), so one index serves the page with no sort and no count. A filter no index
serves (a subject search, or a second of status and source) is applied to a bounded window: at most
`SCAN_WINDOW` emails, newest first, that match the indexed filters. When that window gives less than a
page, the page says where the search stopped and its cursor continues from there.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sqlalchemy import ColumnElement, FromClause, Select, delete, func, select
from sqlalchemy.orm import Session

from storage.models import Content, Email, Event, OutboxItem, Suppression

SCAN_WINDOW = 20_000
"""The most emails one page of a subject search examines."""
EVENTS_SHOWN = 200
"""The most events an email's timeline shows (opens and clicks repeat)."""
_EMAIL = Email.__table__
_SUPPRESSION = Suppression.__table__
_PREFIX_END = "\U0010ffff"
"""Sorts after every character: `[prefix, prefix + _PREFIX_END)` is the index range of a prefix."""
_LISTED = ("id", "recipient", "sender", "subject", "status", "source", "created_at", "sent_at")


@dataclass
class EmailFilter:
    """What the log is narrowed to (None: any)."""

    recipient: str | None = None
    recipient_exact: bool = False
    subject: str | None = None
    subject_contains: bool = False
    status: str | None = None
    source: str | None = None
    from_id: str | None = None
    """The first id of the date range (inclusive)."""
    until_id: str | None = None
    """The id bound after the date range (exclusive)."""


@dataclass
class LogPage:
    rows: list[Any]
    next_cursor: str | None
    searched_to: str | None
    """A bounded search stopped short of a full page after `SCAN_WINDOW` emails: the last id it examined
    (`next_cursor` is the same id). None: the page is full, or nothing is left."""


def _prefix(column: ColumnElement[str], prefix: str) -> list[ColumnElement[bool]]:
    """`column` starts with `prefix`: an index range, and an exact check of the leading characters (the
    range alone relies on the collation ordering by code point, as SQLite's and PostgreSQL's C do)."""
    return [column >= prefix, column < prefix + _PREFIX_END, func.substr(column, 1, len(prefix)) == prefix]


def _conditions(project_id: str, wanted: EmailFilter, cursor: str | None,
                columns: Any) -> tuple[list[ColumnElement[bool]], list[ColumnElement[bool]]]:
    """(what one index serves, what the bounded window filters) for `wanted`, over `columns` (the table's or
    the window's, for the second list)."""
    c = _EMAIL.c
    indexed: list[ColumnElement[bool]] = [c.project_id == project_id]
    scanned: list[ColumnElement[bool]] = []
    if cursor:
        indexed.append(c.id < cursor)
    if wanted.from_id:
        indexed.append(c.id >= wanted.from_id)
    if wanted.until_id:
        indexed.append(c.id < wanted.until_id)
    if wanted.recipient:
        indexed += [c.recipient == wanted.recipient] if wanted.recipient_exact else _prefix(c.recipient,
                                                                                           wanted.recipient)
        # One recipient's mail is few rows: status and source filter them directly.
        indexed += [c.status == wanted.status] if wanted.status else []
        indexed += [c.source == wanted.source] if wanted.source else []
    elif wanted.status:
        indexed.append(c.status == wanted.status)
        scanned += [columns.source == wanted.source] if wanted.source else []
    elif wanted.source:
        indexed.append(c.source == wanted.source)
    if wanted.subject:
        subject = func.lower(columns.subject)
        needle = wanted.subject.lower()
        scanned.append(subject.contains(needle, autoescape=True) if wanted.subject_contains
                       else subject.startswith(needle, autoescape=True))
    return indexed, scanned


def search_emails(session: Session, project_id: str, wanted: EmailFilter, limit: int,
                  cursor: str | None) -> LogPage:
    """One page of the project's emails, newest first, below `cursor`."""
    conn = session.connection()
    listed = [_EMAIL.c[name] for name in _LISTED]
    indexed, _ = _conditions(project_id, wanted, cursor, _EMAIL.c)
    base = select(*listed).where(*indexed).order_by(_EMAIL.c.id.desc())
    window: FromClause | None = None
    if wanted.subject or (wanted.status and wanted.source and not wanted.recipient):
        window = base.limit(SCAN_WINDOW).subquery("window")
        _, scanned = _conditions(project_id, wanted, cursor, window.c)
        stmt: Select[Any] = select(window).where(*scanned).order_by(window.c.id.desc()).limit(limit + 1)
    else:
        stmt = base.limit(limit + 1)
    rows = list(conn.execute(stmt))
    if len(rows) > limit:
        return LogPage(rows[:limit], rows[limit - 1].id, None)
    if window is not None:
        examined = select(_EMAIL.c.id).where(*indexed).order_by(_EMAIL.c.id.desc()).limit(SCAN_WINDOW).subquery()
        count, last = conn.execute(select(func.count(), func.min(examined.c.id))).one()
        if count == SCAN_WINDOW:
            return LogPage(rows, last, last)
    return LogPage(rows, None, None)


@dataclass
class EmailRecord:
    """An email's page: the row, its content (None: gone), what the outbox knows (None: not queued) and its
    events, oldest first (at most `EVENTS_SHOWN`)."""

    email: Email
    content: Content | None
    outbox: OutboxItem | None
    events: list[Event]


def email_record(session: Session, project_id: str, email_id: str) -> EmailRecord | None:
    email = session.execute(select(Email).where(Email.project_id == project_id, Email.id == email_id)
                            ).scalar_one_or_none()
    if email is None:
        return None
    content = session.get(Content, email.content_id)
    outbox = session.execute(select(OutboxItem).where(OutboxItem.email_id == email.id)).scalar_one_or_none()
    events = list(session.execute(select(Event).where(Event.email_id == email.id, Event.project_id == project_id)
                                  .order_by(Event.id).limit(EVENTS_SHOWN)).scalars())
    return EmailRecord(email, content, outbox, events)


def email_content(session: Session, project_id: str, email_id: str) -> tuple[Email, Content | None] | None:
    """An email and its stored content (for the preview and the raw download), or None."""
    row = session.execute(select(Email, Content).outerjoin(Content, Content.id == Email.content_id)
                          .where(Email.project_id == project_id, Email.id == email_id)).one_or_none()
    return None if row is None else (row[0], row[1])


def list_suppressions(session: Session, project_id: str, prefix: str | None, limit: int,
                      cursor: str | None) -> tuple[list[Suppression], str | None]:
    """A page of the suppression list, newest first: (rows, the next page's cursor or None)."""
    stmt = select(Suppression).where(Suppression.project_id == project_id)
    if prefix:
        stmt = stmt.where(*_prefix(Suppression.email, prefix))
    if cursor:
        stmt = stmt.where(Suppression.id < cursor)
    rows = list(session.execute(stmt.order_by(Suppression.id.desc()).limit(limit + 1)).scalars())
    return rows[:limit], rows[limit - 1].id if len(rows) > limit else None


def delete_suppression(session: Session, project_id: str, suppression_id: str) -> str | None:
    """Take the suppression off the list; the address it held, or None when there is no such one."""
    row = session.connection().execute(
        delete(_SUPPRESSION).where(_SUPPRESSION.c.project_id == project_id, _SUPPRESSION.c.id == suppression_id)
        .returning(_SUPPRESSION.c.email)).one_or_none()
    return None if row is None else row.email
