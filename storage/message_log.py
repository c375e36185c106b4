"""The dashboard's message log and suppression list: their queries, each a range of one index.

The log is newest first by id (UUIDv7), paged by cursor (the last id shown). Recipient, status and source
each have a (project_id, <column>, id) index (migration 0013), and a date range is a range of ids
(`storage.retention.id_bound`), so one index serves the page with no sort and no count. A filter no index
serves (a subject search, a second of status and source, or a recipient prefix so common that sorting its
matches would cost more than finding them) is applied to a bounded window: at most
`SCAN_WINDOW` emails, newest first, that match the indexed filters. When that window gives less than a
page, the page says where the search stopped and its cursor continues from there.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from sqlalchemy import ColumnElement, FunctionElement, Select, String, delete, func, select
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.orm import InstrumentedAttribute, Session

from storage.models import Content, Email, Event, OutboxItem, Suppression

SCAN_WINDOW = 10_000
"""The most emails one page of a subject search examines."""
PREFIX_SORTED = 5_000
"""A recipient prefix matching at most this many emails is read from the recipient index and sorted."""
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
    recipient_dense: bool = False
    """Set by `search_emails` when the recipient prefix matches more than `PREFIX_SORTED` emails: it is then
    checked row by row within the bounded window (which such a prefix fills fast) instead of sorting them."""


@dataclass
class LogPage:
    rows: list[Any]
    next_cursor: str | None
    searched_to: str | None
    """A bounded search stopped short of a full page after `SCAN_WINDOW` emails: the last id it examined
    (`next_cursor` is the same id). None: the page is full, or nothing is left."""


def _prefix(column: ColumnElement[str] | InstrumentedAttribute[str], prefix: str) -> list[ColumnElement[bool]]:
    """`column` starts with `prefix`: an index range, and an exact check of the leading characters (the
    range alone relies on the collation ordering by code point, as SQLite's and PostgreSQL's C do)."""
    return [column >= prefix, column < prefix + _PREFIX_END, func.substr(column, 1, len(prefix)) == prefix]


class _NotIndexed(FunctionElement[str]):
    """A column SQLite may not choose an index by (`+column`; it still reads it from the index it uses),
    elsewhere the column itself."""

    inherit_cache = True
    type = String()


@compiles(_NotIndexed)
def _column(element: _NotIndexed, compiler: Any, **kw: Any) -> str:
    return str(compiler.process(element.clauses, **kw))


@compiles(_NotIndexed, "sqlite")
def _column_unindexed(element: _NotIndexed, compiler: Any, **kw: Any) -> str:
    return "+" + str(compiler.process(element.clauses, **kw))


def _order_key(wanted: EmailFilter) -> ColumnElement[str]:
    """The id, as the page orders and bounds by it. For a recipient prefix, on SQLite, kept from the planner:
    keeping no statistics, it would walk (project_id, id) newest first checking each row's recipient (to
    spare a sort) rather than take the prefix's rows from the recipient index and sort those."""
    sorted_prefix = wanted.recipient and not wanted.recipient_exact and not wanted.recipient_dense
    return _NotIndexed(_EMAIL.c.id) if sorted_prefix else _EMAIL.c.id


def _conditions(project_id: str, wanted: EmailFilter,
                cursor: str | None) -> tuple[list[ColumnElement[bool]], list[ColumnElement[bool]]]:
    """(what one index serves, what is checked row by row within the bounded window) for `wanted`."""
    c = _EMAIL.c
    indexed: list[ColumnElement[bool]] = [c.project_id == project_id]
    scanned: list[ColumnElement[bool]] = []
    if wanted.subject:
        subject = func.lower(c.subject)
        needle = wanted.subject.lower()
        scanned.append(subject.contains(needle, autoescape=True) if wanted.subject_contains
                       else subject.startswith(needle, autoescape=True))
    key = _order_key(wanted)
    if cursor:
        indexed.append(key < cursor)
    if wanted.from_id:
        indexed.append(key >= wanted.from_id)
    if wanted.until_id:
        indexed.append(key < wanted.until_id)
    if wanted.recipient and not wanted.recipient_dense:
        indexed += [c.recipient == wanted.recipient] if wanted.recipient_exact else _prefix(c.recipient,
                                                                                           wanted.recipient)
        # One recipient's (or a rare prefix's) mail is few rows: status and source filter them directly.
        indexed += [c.status == wanted.status] if wanted.status else []
        indexed += [c.source == wanted.source] if wanted.source else []
        return indexed, scanned
    if wanted.recipient:
        scanned += _prefix(c.recipient, wanted.recipient)
    if wanted.status:
        # The status index carries the source: a source with it is checked on the index entries (and SQLite
        # is kept from taking the source's index instead).
        indexed.append(c.status == wanted.status)
        scanned += [_NotIndexed(c.source) == wanted.source] if wanted.source else []
    elif wanted.source:
        indexed.append(c.source == wanted.source)
    return indexed, scanned


def window_query(project_id: str, wanted: EmailFilter, cursor: str | None) -> Select[int, Any]:
    """(how many, the oldest id) of the bounded window: the `SCAN_WINDOW` newest emails below `cursor` that
    the indexed filters match, an index-only walk."""
    indexed, _ = _conditions(project_id, wanted, cursor)
    window = select(_EMAIL.c.id).where(*indexed).order_by(_EMAIL.c.id.desc()).limit(SCAN_WINDOW).subquery()
    return select(func.count(), func.min(window.c.id))


def log_query(project_id: str, wanted: EmailFilter, limit: int, cursor: str | None,
              window_end: str | None = None) -> Select[Any]:
    """The statement of one page (`limit` + 1 rows, to tell whether more follow). For a bounded search,
    `window_end` keeps it within the window: it walks the index newest first and stops at a full page."""
    indexed, scanned = _conditions(project_id, wanted, cursor)
    if window_end is not None:
        scanned.append(_EMAIL.c.id >= window_end)
    stmt = (select(*[_EMAIL.c[name] for name in _LISTED]).where(*indexed, *scanned)
            .order_by(_order_key(wanted).desc()).limit(limit + 1))
    return stmt


def is_bounded(wanted: EmailFilter) -> bool:
    """Whether a filter no index serves is applied (to a window of at most `SCAN_WINDOW` emails)."""
    return bool(wanted.subject or wanted.recipient_dense or (wanted.status and wanted.source and not wanted.recipient))


def search_emails(session: Session, project_id: str, wanted: EmailFilter, limit: int,
                  cursor: str | None) -> LogPage:
    """One page of the project's emails, newest first, below `cursor`."""
    conn = session.connection()
    if wanted.recipient and not wanted.recipient_exact:
        probe = (select(_EMAIL.c.id).where(_EMAIL.c.project_id == project_id, *_prefix(_EMAIL.c.recipient,
                                                                                      wanted.recipient))
                 .limit(PREFIX_SORTED).subquery())
        if conn.execute(select(func.count()).select_from(probe)).scalar_one() == PREFIX_SORTED:
            wanted = replace(wanted, recipient_dense=True)
    window_end = None
    if is_bounded(wanted):
        count, oldest = conn.execute(window_query(project_id, wanted, cursor)).one()
        window_end = oldest if count == SCAN_WINDOW else None
    rows = list(conn.execute(log_query(project_id, wanted, limit, cursor, window_end)))
    if len(rows) > limit:
        return LogPage(rows[:limit], rows[limit - 1].id, None)
    return LogPage(rows, window_end, window_end)


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
    # By the email alone: `ix_events_email_id` (the email was found in the project above); with the project
    # too, SQLite walks the project's whole event index instead.
    events = list(session.execute(select(Event).where(Event.email_id == email.id)
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
