"""Event queries."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from storage import fastpath
from storage.batch import write_at_commit
from storage.contacts import locked_batch
from storage.db import delete_some
from storage.models import Event, new_id, utcnow
from storage.pagination import Page, paginate

_EVENTS = Event.__table__
_INSERT = _EVENTS.insert()


def insert_event(session: Session, project_id: str, contact_id: str | None, name: str,
                 data: dict[str, Any], email_id: str | None = None) -> tuple[str, datetime]:
    """Insert an event row (a Core insert: this runs on every track and send; in a batch of locked contacts,
    at its commit: `storage.contacts.locked_batch`); return its id and time. Record events through
    `pipeline.events.record_event`, which also writes what the event sets off."""
    event_id, now = new_id(), utcnow()
    row = {"id": event_id, "project_id": project_id, "contact_id": contact_id, "name": name, "data": data,
           "email_id": email_id, "created_at": now}
    if locked_batch(session):
        write_at_commit(session, _INSERT, row)
    else:
        fastpath.execute(session, _INSERT, row)
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
    """How many events of `name` fell between each two consecutive `edges` (len(edges) - 1 counts, each its
    own range of the (project_id, name, created_at) index)."""
    counts = []
    for start, end in zip(edges, edges[1:], strict=False):
        stmt = select(func.count()).select_from(Event).where(
            Event.project_id == project_id, Event.name == name, Event.created_at >= start, Event.created_at < end)
        counts.append(session.execute(stmt).scalar_one())
    return counts


def event_names_by_frequency(session: Session, project_id: str) -> list[str]:
    return [name for name, _ in event_counts(session, project_id, None, None)]


def recent_event_names(session: Session, project_id: str, sample: int) -> list[str]:
    """The names among the newest `sample` events, sorted (a bounded read of the (project_id, id) index)."""
    rows = session.execute(select(Event.name).where(Event.project_id == project_id)
                           .order_by(Event.id.desc()).limit(sample))
    return sorted({name for (name,) in rows})


def _names(project_id: str) -> Any:
    """The project's distinct event names: one probe of the (project_id, name, ...) index per name (a
    recursive "skip scan"), not a read of every event."""
    names = select(func.min(Event.name).label("name")).where(Event.project_id == project_id).cte(
        "names", recursive=True)
    following = select(func.min(Event.name)).where(Event.project_id == project_id, Event.name > names.c.name)
    return names.union_all(select(following.scalar_subquery()).where(names.c.name.is_not(None)))


def event_counts(session: Session, project_id: str, start: datetime | None,
                       end: datetime | None) -> list[tuple[str, int]]:
    """Events per name between `start` and `end` (either open), most frequent first, names with none left
    out. One statement: each name is counted over its own range of the (project_id, name, created_at)
    index, so a period costs what it holds, not what the project has ever recorded."""
    names = _names(project_id)
    counted = select(func.count()).select_from(Event).where(Event.project_id == project_id,
                                                            Event.name == names.c.name)
    if start is not None:
        counted = counted.where(Event.created_at >= start)
    if end is not None:
        counted = counted.where(Event.created_at <= end)
    count = counted.scalar_subquery().label("n")
    rows = session.execute(select(names.c.name, count).where(names.c.name.is_not(None)))
    return sorted(((row.name, row.n) for row in rows if row.n), key=lambda item: (-item[1], item[0]))


def delete_events_named(session: Session, project_id: str, name: str, limit: int) -> int:
    """Delete up to `limit` of the project's events named `name` (`storage.db.Database.write_in_chunks`); returns
    how many (fewer than `limit`: none is left). One range of `ix_events_project_id_name_id` each time."""
    return delete_some(session, _EVENTS, _EVENTS.c.project_id == project_id, _EVENTS.c.name == name, limit=limit)
