"""Contact queries. Emails arrive here already lower-cased by the pipeline.

The write path (track, send, import) uses Core statements on the session's connection: it runs
for every request, and the ORM's unit of work costs several times more per row. Rows come back as
`ContactRecord`s, plain dataclasses.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import LargeBinary, Text, bindparam, cast, delete, func, select
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.orm import Session

from storage.models import Contact, new_id, utcnow
from storage.pagination import Page, paginate


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
_BY_ID_LOCKED = _BY_ID.with_for_update()
_BY_EMAIL = select(*_COLUMNS).where(_TABLE.c.project_id == bindparam("p"), _TABLE.c.email == bindparam("e"))
_BY_EMAIL_LOCKED = _BY_EMAIL.with_for_update()
_INSERT = _TABLE.insert()
_UPDATE = _TABLE.update().where(_TABLE.c.id == bindparam("contact_id"))
_INSERT_IF_ABSENT = {
    "postgresql": pg_insert(_TABLE).on_conflict_do_nothing(index_elements=["project_id", "email"]),
    "sqlite": sqlite_insert(_TABLE).on_conflict_do_nothing(index_elements=["project_id", "email"]),
}


def _one(session: Session, stmt: Any, params: dict[str, Any]) -> ContactRecord | None:
    row = session.connection().execute(stmt, params).first()
    return None if row is None else ContactRecord(*row)


def get_contact(session: Session, project_id: str, contact_id: str, for_update: bool = False) -> ContactRecord | None:
    """`for_update` locks the row (PostgreSQL) so two transactions changing the contact take turns."""
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
    return _one(session, _BY_EMAIL_LOCKED if for_update else _BY_EMAIL, {"p": project_id, "e": email})


def insert_contact(session: Session, project_id: str, email: str, subscribed: bool,
                   data: dict[str, Any]) -> ContactRecord:
    now = utcnow()
    record = ContactRecord(new_id(), email, subscribed, data, now, now)
    session.connection().execute(_INSERT, {**vars(record), "project_id": project_id})
    return record


def get_or_create_contact(session: Session, project_id: str, email: str,
                          subscribed_if_new: bool) -> tuple[ContactRecord, bool]:
    """Return the contact (locked for update on PostgreSQL) and whether it was just created.

    Safe against a concurrent creator: the insert does nothing on conflict and we read the winner.
    """
    contact = get_contact_by_email(session, project_id, email, for_update=True)
    if contact is not None:
        return contact, False
    now = utcnow()
    record = ContactRecord(new_id(), email, subscribed_if_new, {}, now, now)
    stmt = _INSERT_IF_ABSENT[session.get_bind().dialect.name]
    result = session.connection().execute(stmt, {**vars(record), "project_id": project_id})
    if result.rowcount == 1:
        return record, True
    contact = get_contact_by_email(session, project_id, email, for_update=True)
    assert contact is not None
    return contact, False


def update_contact(session: Session, contact_id: str, **values: Any) -> None:
    """Set columns (email, subscribed, data) of one contact and bump updated_at."""
    session.connection().execute(_UPDATE, {"contact_id": contact_id, "updated_at": utcnow(), **values})


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
    session.connection().execute(delete(Contact).where(Contact.project_id == project_id, Contact.id == contact_id))
