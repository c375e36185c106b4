"""Contact queries. Emails arrive here already lower-cased by the pipeline.

The write path (track, send, import) uses Core statements on the session's connection: it runs
for every request, and the ORM's unit of work costs several times more per row. Rows come back as
`ContactRecord`s, plain dataclasses.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import (
    JSON,
    ColumnElement,
    LargeBinary,
    String,
    Text,
    any_,
    bindparam,
    cast,
    column,
    delete,
    event,
    func,
    select,
    update,
)
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.orm import Session

from storage import fastpath
from storage.batch import flush_pending, write_at_commit
from storage.db import delete_some
from storage.models import Contact, Email, Event, Segment, SegmentMember, new_id, utcnow
from storage.pagination import Page, paginate
from storage.segments import condition_clause


@dataclass
class ContactRecord:
    id: str
    email: str
    subscribed: bool
    data: dict[str, Any]
    created_at: datetime
    updated_at: datetime


_TABLE = Contact.__table__
_COLUMNS = [_TABLE.c[name] for name in ("id", "email", "subscribed", "data", "created_at", "updated_at")]
# Statements built once and executed with parameters: building them per call costs more than SQLite.
_BY_ID = select(*_COLUMNS).where(_TABLE.c.project_id == bindparam("p"), _TABLE.c.id == bindparam("i"))
_BY_ID_LOCKED = _BY_ID.with_for_update(key_share=True)
"""Locked against other changes of the contact, FOR NO KEY UPDATE (what PostgreSQL's own UPDATE of columns that
are no key takes), not FOR UPDATE: every row written elsewhere that references the contact (an event, a
campaign's email) locks it FOR KEY SHARE until its transaction ends, and FOR UPDATE would wait for that (a
receipt to a contact in a campaign being fanned out waited for the chunk's commit). An UPDATE of the email, a
key, still takes FOR UPDATE itself. SQLite has no row locks."""
_BY_EMAIL = select(*_COLUMNS).where(_TABLE.c.project_id == bindparam("p"), _TABLE.c.email == bindparam("e"))
_BY_EMAIL_LOCKED = _BY_EMAIL.with_for_update(key_share=True)
_INSERT = _TABLE.insert()
_UPDATE = _TABLE.update().where(_TABLE.c.id == bindparam("contact_id"))
_BY_PROJECT = select(*_COLUMNS).where(_TABLE.c.project_id == bindparam("p"))
_LOCK_BATCH = {
    "postgresql": _BY_PROJECT.where(_TABLE.c.email == any_(bindparam("e", type_=ARRAY(String))))
    .order_by(_TABLE.c.id).with_for_update(key_share=True),
    "sqlite": _BY_PROJECT.where(_TABLE.c.email.in_(
        select(column("value")).select_from(func.json_each(bindparam("e", type_=JSON))).scalar_subquery())),
}
"""A project's contacts among the emails of `e`, given as one parameter (an array; SQLite: a JSON array) so the
statement is compiled once whatever the batch's size."""
_INSERT_IF_ABSENT = {
    "postgresql": pg_insert(_TABLE).on_conflict_do_nothing(index_elements=["project_id", "email"]),
    "sqlite": sqlite_insert(_TABLE).on_conflict_do_nothing(index_elements=["project_id", "email"]),
}


_LOCKED = "plunkd.locked_contacts"
"""session.info key of a `LockedContacts`, for the transaction that read them."""


@dataclass
class LockedContacts:
    """The contacts of a batch of `ContactWork`s, read and locked at its start: within that transaction they
    are the truth (every change of them goes through `update_contact`, which changes the record too), so
    lookups of them need no statement, and their updates are written at commit."""

    by_key: dict[tuple[str, str], ContactRecord | None]
    """(project id, email) -> the contact, or None: no such contact at the batch's start."""
    by_id: dict[str, ContactRecord]


@dataclass
class ContactWork:
    """A write (`Database.write`) that upserts the contacts of `keys` ((project id, email), lower-cased):
    track and send. A batch made only of these reads all their contacts with one statement per project instead
    of one each (`storage.batch`; locking them on PostgreSQL, where SQLite's one writer needs no lock), and
    writes the contacts it creates, their updates and events at commit, one executemany each (on PostgreSQL one
    statement with the batch's other inserts): a statement is a round trip on PostgreSQL, and on SQLite costs
    more than its work."""

    fn: Callable[[Session], Any]
    keys: Sequence[tuple[str, str]]

    def __call__(self, session: Session) -> Any:
        return self.fn(session)

    @classmethod
    def prepare_batch(cls, session: Session, works: list[ContactWork]) -> None:
        statement = _LOCK_BATCH[session.get_bind().dialect.name]
        emails: dict[str, set[str]] = {}
        for work in works:
            for project_id, email in work.keys:
                emails.setdefault(project_id, set()).add(email)
        locked = LockedContacts({}, {})
        for project_id, addresses in emails.items():
            locked.by_key.update(dict.fromkeys(((project_id, email) for email in addresses), None))
            for row in fastpath.fetch(session, statement, {"p": project_id, "e": sorted(addresses)}):
                record = ContactRecord(*row)
                locked.by_key[(project_id, record.email)] = locked.by_id[record.id] = record
        session.info[_LOCKED] = locked


def locked_batch(session: Session) -> bool:
    """Whether this transaction runs a batch of `ContactWork`s whose contacts it has locked: its events are
    written at commit (`storage.events.insert_event`); a statement that reads events or contacts' data must
    call `storage.batch.flush_pending` first (segments and workflows do)."""
    return _LOCKED in session.info


@event.listens_for(Session, "after_commit")
@event.listens_for(Session, "after_soft_rollback")
def _forget_locked(session: Session, *_: Any) -> None:
    """The locked contacts are the truth only in the transaction that read them (a rolled-back savepoint too
    may have undone a change of them)."""
    session.info.pop(_LOCKED, None)


_CREATED = "plunkd.created_contacts"
"""session.info key: the (project id, email) of the contacts this transaction queued for its commit."""
_CREATING: set[tuple[str, str]] = set()
"""(project id, email) of the new contacts queued for commit by transactions of this process that have not ended:
the writer's next batch takes its statements while the previous one commits, and would find such a contact absent
too, then fail on it at commit and run again with savepoints."""


@event.listens_for(Session, "after_transaction_end")
def _forget_created(session: Session, transaction: Any) -> None:
    """However the transaction ended (committed, rolled back, or closed with its connection lost)."""
    if transaction.parent is None:
        for key in session.info.pop(_CREATED, ()):
            _CREATING.discard(key)


def _one(session: Session, stmt: Any, params: dict[str, Any]) -> ContactRecord | None:
    rows = fastpath.fetch(session, stmt, params)
    return ContactRecord(*rows[0]) if rows else None


def get_contact(session: Session, project_id: str, contact_id: str, for_update: bool = False) -> ContactRecord | None:
    """`for_update` locks the row (PostgreSQL) so two transactions changing the contact take turns."""
    locked: LockedContacts | None = session.info.get(_LOCKED)
    record = None if locked is None else locked.by_id.get(contact_id)
    if locked is not None and record is not None:
        return record if locked.by_key.get((project_id, record.email)) is record else None
    return _one(session, _BY_ID_LOCKED if for_update else _BY_ID, {"p": project_id, "i": contact_id})


def addresses_by_id(session: Session, project_id: str, ids: list[str]) -> dict[str, tuple[str, bool]]:
    """(email, subscribed) of the project's contacts among `ids`, by id (the missing are left out)."""
    if not ids:
        return {}
    rows = session.connection().execute(select(_TABLE.c.id, _TABLE.c.email, _TABLE.c.subscribed).where(
        _TABLE.c.project_id == project_id, _TABLE.c.id.in_(ids)))
    return {contact_id: (email, subscribed) for contact_id, email, subscribed in rows}


def data_by_id(session: Session, project_id: str, ids: list[str]) -> dict[str, dict[str, Any]]:
    """The data of the project's contacts among `ids`, by id (the missing are left out)."""
    if not ids:
        return {}
    rows = session.connection().execute(select(_TABLE.c.id, _TABLE.c.data).where(
        _TABLE.c.project_id == project_id, _TABLE.c.id.in_(ids)))
    return {contact_id: data or {} for contact_id, data in rows}


def largest_data_bytes(session: Session, project_id: str) -> int:
    """Octets of the largest contact data of the project as stored (JSON text): no value in any contact's
    data is longer."""
    text = cast(_TABLE.c.data, Text)
    size = func.octet_length(text) if session.get_bind().dialect.name == "postgresql" else \
        func.length(cast(text, LargeBinary))
    return session.connection().execute(select(func.max(size)).where(_TABLE.c.project_id == project_id)).scalar() or 0


def all_data(session: Session, project_id: str) -> Iterator[dict[str, Any]]:
    """The data of every contact of the project, read in batches."""
    rows = session.connection().execute(
        select(_TABLE.c.data).where(_TABLE.c.project_id == project_id).execution_options(yield_per=1000))
    for (data,) in rows:
        if data:
            yield data


def get_contact_by_email(session: Session, project_id: str, email: str,
                         for_update: bool = False) -> ContactRecord | None:
    locked = session.info.get(_LOCKED)
    if locked is not None and (project_id, email) in locked.by_key:
        return locked.by_key[(project_id, email)]
    return _one(session, _BY_EMAIL_LOCKED if for_update else _BY_EMAIL, {"p": project_id, "e": email})


def insert_contact(session: Session, project_id: str, email: str, subscribed: bool,
                   data: dict[str, Any]) -> ContactRecord:
    now = utcnow()
    record = ContactRecord(new_id(), email, subscribed, data, now, now)
    session.connection().execute(_INSERT, {**vars(record), "project_id": project_id})
    return record


def get_or_create_contact(session: Session, project_id: str, email: str, subscribed_if_new: bool,
                          data_if_new: dict[str, Any] | None = None) -> tuple[ContactRecord, bool]:
    """Return the contact (locked for update on PostgreSQL) and whether it was just created (with
    `data_if_new` as its data: one statement fewer than an insert and then an update).

    A contact a batch of `ContactWork`s found absent when it locked its contacts is written with the batch's
    other rows at commit (`write_at_commit`: on PostgreSQL in the statement that writes its emails and events),
    not by a round trip of its own: a batch of sends to new addresses waited on one per address. Should a
    concurrent creator commit the address first, that insert fails the batch, which runs again with a savepoint
    around each work, and there, as outside a batch, the insert does nothing on conflict and we read the winner.
    An address another transaction of this process is creating (`_CREATING`) is inserted at once the same way,
    which waits for that transaction's end.
    """
    contact = get_contact_by_email(session, project_id, email, for_update=True)
    if contact is not None:
        return contact, False
    now = utcnow()
    record = ContactRecord(new_id(), email, subscribed_if_new, data_if_new or {}, now, now)
    locked: LockedContacts | None = session.info.get(_LOCKED)
    key = (project_id, email)
    if locked is not None and key in locked.by_key and key not in _CREATING:
        write_at_commit(session, _INSERT, {**vars(record), "project_id": project_id})
        _CREATING.add(key)
        session.info.setdefault(_CREATED, []).append(key)
        _remember(session, project_id, record)
        return record, True
    stmt = _INSERT_IF_ABSENT[session.get_bind().dialect.name]
    if fastpath.execute(session, stmt, {**vars(record), "project_id": project_id}) == 1:
        _remember(session, project_id, record)
        return record, True
    contact = _one(session, _BY_EMAIL_LOCKED, {"p": project_id, "e": email})  # a concurrent creator's
    assert contact is not None
    _remember(session, project_id, contact)
    return contact, False


def _unlock(session: Session) -> None:
    """Stop treating the batch's locked contacts as the truth (before a change their records do not follow):
    their queued updates are written first, so statements see them from then on."""
    if session.info.pop(_LOCKED, None) is not None:
        flush_pending(session)


def _remember(session: Session, project_id: str, record: ContactRecord) -> None:
    """Add a contact just created or found to the batch's locked contacts, when its key is among them."""
    locked = session.info.get(_LOCKED)
    if locked is not None and (project_id, record.email) in locked.by_key:
        locked.by_key[(project_id, record.email)] = locked.by_id[record.id] = record


def update_contact(session: Session, contact_id: str, **values: Any) -> None:
    """Set columns (email, subscribed, data) of one contact and bump updated_at. A contact of a locked batch
    (`ContactWork`) is changed in its record, and its whole row written at commit."""
    now = utcnow()
    if "email" in values:
        _unlock(session)
    locked = session.info.get(_LOCKED)
    record = None if locked is None else locked.by_id.get(contact_id)
    if record is None:
        fastpath.execute(session, _UPDATE, {"contact_id": contact_id, "updated_at": now, **values})
        return
    for name, value in values.items():
        setattr(record, name, value)
    record.updated_at = now
    write_at_commit(session, _UPDATE, {"contact_id": contact_id, "updated_at": now, "subscribed": record.subscribed,
                                       "data": record.data})


def _filters(project_id: str, subscribed: bool | None, search: str | None) -> list[Any]:
    """The project's contacts, optionally only (un)subscribed ones and those whose email contains `search`."""
    filters = [Contact.project_id == project_id]
    if subscribed is not None:
        filters.append(Contact.subscribed == subscribed)
    if search:
        escaped = search.lower().replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
        filters.append(Contact.email.like(f"%{escaped}%", escape="\\"))
    return filters


def list_contacts(session: Session, project_id: str, limit: int, cursor: str | None,
                  subscribed: bool | None = None, search: str | None = None) -> Page:
    stmt = select(Contact).where(*_filters(project_id, subscribed, search))
    return paginate(session, stmt, Contact.id, limit, cursor)


def contacts_after(session: Session, project_id: str, after_id: str | None, size: int,
                   subscribed: bool | None = None, search: str | None = None) -> list[ContactRecord]:
    """Up to `size` contacts (filtered as `list_contacts`), newest first, below `after_id`: one keyset page
    of a read of every contact, each page its own short transaction. No count, unlike `list_contacts`."""
    stmt = select(*_COLUMNS).where(*_filters(project_id, subscribed, search))
    if after_id is not None:
        stmt = stmt.where(_TABLE.c.id < after_id)
    rows = session.connection().execute(stmt.order_by(_TABLE.c.id.desc()).limit(size))
    return [ContactRecord(*row) for row in rows]


def data_keys(session: Session, project_id: str, sample: int) -> list[str]:
    """The keys of the data of the newest `sample` contacts, sorted: what the segment builder offers
    (read from a bounded sample, so it costs the same at 100 contacts or 100,000)."""
    rows = session.connection().execute(select(_TABLE.c.data).where(_TABLE.c.project_id == project_id)
                                        .order_by(_TABLE.c.id.desc()).limit(sample))
    return sorted({key for (data,) in rows if isinstance(data, dict) for key in data})


def count_contacts(session: Session, project_id: str) -> int:
    stmt = select(func.count()).select_from(Contact).where(Contact.project_id == project_id)
    return session.execute(stmt).scalar_one()


def delete_contact(session: Session, project_id: str, contact_id: str) -> None:
    _unlock(session)
    session.connection().execute(delete(Contact).where(Contact.project_id == project_id, Contact.id == contact_id))


def detach_rows(session: Session, contact_id: str, limit: int) -> int:
    """Before a contact is deleted, a part at a time (`storage.db.Database.write_in_chunks`): delete up to `limit`
    of its events, and when fewer are left, unlink up to the rest of `limit` of its emails (what the foreign keys'
    CASCADE and SET NULL would do with all of them in the DELETE's own transaction). Returns how many rows
    changed (fewer than `limit`: none is left)."""
    events = Event.__table__
    changed = delete_some(session, events, events.c.contact_id == contact_id, limit=limit)
    if changed < limit:
        emails = select(Email.id).where(Email.contact_id == contact_id).limit(limit - changed)
        changed += session.connection().execute(update(Email).where(Email.id.in_(emails)).values(
            contact_id=None)).rowcount
    return changed


SCAN_LIMIT = 2000
"""Contacts a dashboard page looks at, at most, to fill itself when a filter no index serves (a data key,
or subscription within an email prefix) is given; the page then says so and links past them."""


@dataclass(frozen=True)
class ContactFilter:
    """What the dashboard's contact list and export select. `prefix` (lower-cased) pages in email order
    along the (project_id, email) index; otherwise newest first along (project_id, [subscribed,] id)."""

    prefix: str = ""
    subscribed: bool | None = None
    key: str = ""
    value: str | None = None
    """With `key`: its value equals this text, or the JSON number / boolean it spells; None: the key is present."""


@dataclass
class Browsed:
    items: list[ContactRecord]
    next_cursor: str | None
    scan_limited: bool
    """The page looked at `SCAN_LIMIT` contacts without filling itself: there may be more after `next_cursor`."""


def _after_prefix(prefix: str) -> str:
    """The least text above every text starting with `prefix`, in code-point order."""
    return prefix[:-1] + chr(ord(prefix[-1]) + 1)


def _data_condition(key: str, value: str | None) -> ColumnElement[bool]:
    field = f"data.{key}"
    if value is None:
        return condition_clause({"field": field, "op": "exists"}, utcnow())
    spelled: list[Any] = [value]
    try:
        typed = json.loads(value)
    except ValueError:
        typed = None
    if isinstance(typed, bool | int | float) and (not isinstance(typed, float) or math.isfinite(typed)):
        spelled.append(typed)
    return condition_clause({"any": [{"field": field, "op": "equals", "value": v} for v in spelled]}, utcnow())


def browse_contacts(session: Session, project_id: str, chosen: ContactFilter, after: str | None,
                    size: int) -> Browsed:
    """One page of the dashboard's contact list (see `ContactFilter` for the order); `after` is the last
    email (with a prefix) or id (without) of the previous page. Every query walks an index; a filter no
    index serves is applied to at most `SCAN_LIMIT` contacts per page."""
    table = _TABLE
    postgres = session.get_bind().dialect.name == "postgresql"
    indexed: list[ColumnElement[bool]] = [table.c.project_id == project_id]
    residual: list[ColumnElement[bool]] = []
    if chosen.prefix:
        email = table.c.email.collate("C") if postgres else table.c.email
        indexed += [email >= chosen.prefix, email < _after_prefix(chosen.prefix)]
        if after is not None:
            indexed.append(email > after)
        order, key_column = [email.asc()], email
        if chosen.subscribed is not None:
            residual.append(table.c.subscribed == chosen.subscribed)
    else:
        if chosen.subscribed is not None:
            indexed.append(table.c.subscribed == chosen.subscribed)
        if after is not None:
            indexed.append(table.c.id < after)
        order, key_column = [table.c.id.desc()], table.c.id
    if chosen.key:
        residual.append(_data_condition(chosen.key, chosen.value))
    connection = session.connection()
    if not residual:
        rows = [ContactRecord(*row) for row in connection.execute(
            select(*_COLUMNS).where(*indexed).order_by(*order).limit(size + 1))]
        more = len(rows) > size
        rows = rows[:size]
        return Browsed(rows, _key_of(rows[-1], chosen) if more else None, False)
    window = select(table.c.id, key_column.label("k")).where(*indexed).order_by(*order).limit(SCAN_LIMIT)
    if postgres:  # drives the page by the window's ids through the primary key, never a hash join over the table
        in_window = table.c.id == any_(func.array(select(window.subquery().c.id).scalar_subquery()))
        stmt = select(*_COLUMNS).where(in_window, *residual)
    else:
        joined = window.subquery()
        stmt = select(*_COLUMNS).join(joined, joined.c.id == table.c.id).where(*residual)
    rows = [ContactRecord(*row) for row in connection.execute(stmt.order_by(*order).limit(size + 1))]
    if len(rows) > size:
        return Browsed(rows[:size], _key_of(rows[size - 1], chosen), False)
    looked = window.subquery()
    edge = func.max(looked.c.k) if chosen.prefix else func.min(looked.c.k)
    count, last = connection.execute(select(func.count(), edge)).one()
    if count < SCAN_LIMIT:
        return Browsed(rows, None, False)
    return Browsed(rows, last, True)


def _key_of(contact: ContactRecord, chosen: ContactFilter) -> str:
    return contact.email if chosen.prefix else contact.id


def contact_events(session: Session, contact_id: str, after: str | None, size: int) -> tuple[list[Any], str | None]:
    """The contact's events, newest first, along (contact_id, id): (rows of id, name, data, email_id,
    created_at; the next page's cursor)."""
    table = Event.__table__
    stmt = select(table.c.id, table.c.name, table.c.data, table.c.email_id, table.c.created_at).where(
        table.c.contact_id == contact_id)
    return _newest_first(session, stmt, table.c.id, after, size)


def contact_emails(session: Session, contact_id: str, after: str | None, size: int) -> tuple[list[Any], str | None]:
    """The contact's emails, newest first, along (contact_id, id)."""
    table = Email.__table__
    stmt = select(table.c.id, table.c.subject, table.c.status, table.c.source, table.c.created_at).where(
        table.c.contact_id == contact_id)
    return _newest_first(session, stmt, table.c.id, after, size)


def contact_segments(session: Session, contact_id: str) -> list[Any]:
    """The tracked segments the contact is in (id, name, slug, entered_at), by name."""
    members, segments = SegmentMember.__table__, Segment.__table__
    stmt = (select(segments.c.id, segments.c.name, segments.c.slug, members.c.entered_at)
            .join(members, members.c.segment_id == segments.c.id).where(members.c.contact_id == contact_id)
            .order_by(segments.c.name).limit(500))
    return list(session.connection().execute(stmt))


def _newest_first(session: Session, stmt: Any, id_column: Any, after: str | None,
                  size: int) -> tuple[list[Any], str | None]:
    if after is not None:
        stmt = stmt.where(id_column < after)
    rows = list(session.connection().execute(stmt.order_by(id_column.desc()).limit(size + 1)))
    return rows[:size], rows[size - 1].id if len(rows) > size else None
