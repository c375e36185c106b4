"""Event queries."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import delete, func, select
from sqlalchemy.orm import Session

from storage import webhooks as webhook_store
from storage import workflows as workflow_store
from storage.models import Event, new_id, utcnow
from storage.pagination import Page, paginate

_INSERT = Event.__table__.insert()


def insert_event(session: Session, project_id: str, contact_id: str | None, name: str,
                 data: dict[str, Any], email_id: str | None = None) -> tuple[str, datetime]:
    """Record an event (a Core insert: this runs on every track and send); return its id and time.
    A contact's event also starts the workflow runs it triggers and resumes the runs waiting for it, in
    this same transaction (`storage.workflows.on_event`: a cache lookup when no workflow listens for it),
    so an event that commits has its runs and one that rolls back has none, whichever path recorded it.
    Every event also queues its outbound webhook deliveries in this transaction (`storage.webhooks.on_event`,
    a cache lookup when no endpoint of the project listens for it)."""
    event_id, now = new_id(), utcnow()
    session.connection().execute(_INSERT, {"id": event_id, "project_id": project_id, "contact_id": contact_id,
                                           "name": name, "data": data, "email_id": email_id, "created_at": now})
    if contact_id is not None:
        workflow_store.on_event(session, project_id, contact_id, name, event_id, data, now)
    webhook_store.on_event(session, project_id, contact_id, name, event_id, data, email_id, now)
    return event_id, now


def list_events(session: Session, project_id: str, limit: int, cursor: str | None,
                      name: str | None = None, contact_id: str | None = None) -> Page:
    stmt = select(Event).where(Event.project_id == project_id)
    if name is not None:
        stmt = stmt.where(Event.name == name)
    if contact_id is not None:
        stmt = stmt.where(Event.contact_id == contact_id)
    return paginate(session, stmt, Event.id, limit, cursor)


def event_names_by_frequency(session: Session, project_id: str) -> list[str]:
    count = func.count().label("n")
    stmt = (select(Event.name, count).where(Event.project_id == project_id)
            .group_by(Event.name).order_by(count.desc(), Event.name))
    return [row.name for row in session.execute(stmt)]


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
