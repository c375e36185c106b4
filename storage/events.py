"""Event queries."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import and_, case, delete, func, select
from sqlalchemy.orm import Session

from storage.models import Event, new_id, utcnow
from storage.pagination import Page, paginate

_INSERT = Event.__table__.insert()


def insert_event(session: Session, project_id: str, contact_id: str | None, name: str,
                 data: dict[str, Any], email_id: str | None = None) -> tuple[str, datetime]:
    """Insert an event row (a Core insert: this runs on every track and send); return its id and time.
    Record events through `pipeline.events.record_event`, which also writes what the event sets off."""
    event_id, now = new_id(), utcnow()
    session.connection().execute(_INSERT, {"id": event_id, "project_id": project_id, "contact_id": contact_id,
                                           "name": name, "data": data, "email_id": email_id, "created_at": now})
    return event_id, now


def list_events(session: Session, project_id: str, limit: int, cursor: str | None,
                      name: str | None = None, contact_id: str | None = None, count: bool = True) -> Page:
    """Newest first; without `count` the events are not counted (the dashboard's pages of one name read
    (project_id, name, id) and nothing more)."""
    stmt = select(Event).where(Event.project_id == project_id)
    if name is not None:
        stmt = stmt.where(Event.name == name)
    if contact_id is not None:
        stmt = stmt.where(Event.contact_id == contact_id)
    return paginate(session, stmt, Event.id, limit, cursor, count)


def event_buckets(session: Session, project_id: str, name: str, edges: list[datetime]) -> list[int]:
    """How many events of `name` fell between each two consecutive `edges` (len(edges) - 1 counts), in one
    pass over the (project_id, name, created_at) index."""
    columns = [func.coalesce(func.sum(case((and_(Event.created_at >= start, Event.created_at < end), 1), else_=0)), 0)
               for start, end in zip(edges, edges[1:], strict=False)]
    row = session.execute(select(*columns).where(Event.project_id == project_id, Event.name == name,
                                                 Event.created_at >= edges[0], Event.created_at < edges[-1])).one()
    return [int(value) for value in row]


def event_names_by_frequency(session: Session, project_id: str) -> list[str]:
    count = func.count().label("n")
    stmt = (select(Event.name, count).where(Event.project_id == project_id)
            .group_by(Event.name).order_by(count.desc(), Event.name))
    return [row.name for row in session.execute(stmt)]


def recent_event_names(session: Session, project_id: str, sample: int) -> list[str]:
    """The names among the newest `sample` events, sorted (a bounded read of the (project_id, id) index)."""
    rows = session.execute(select(Event.name).where(Event.project_id == project_id)
                           .order_by(Event.id.desc()).limit(sample))
    return sorted({name for (name,) in rows})


def event_counts(session: Session, project_id: str, start: datetime | None,
                       end: datetime | None) -> list[tuple[str, int]]:
    count = func.count().label("n")
    stmt = select(Event.name, count).where(Event.project_id == project_id)
    if start is not None:
        stmt = stmt.where(Event.created_at >= start)
    if end is not None:
        stmt = stmt.where(Event.created_at <= end)
    stmt = stmt.group_by(Event.name).order_by(count.desc(), Event.name)
    return [(row.name, row.n) for row in session.execute(stmt)]


def delete_events_named(session: Session, project_id: str, name: str) -> int:
    result = session.connection().execute(delete(Event).where(Event.project_id == project_id, Event.name == name))
    return result.rowcount
