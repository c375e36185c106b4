"""Event queries."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import delete, func, select
from sqlalchemy.ext.asyncio import AsyncSession

from storage.models import Event
from storage.pagination import Page, paginate


async def insert_event(session: AsyncSession, project_id: str, contact_id: str | None, name: str,
                       data: dict[str, Any], email_id: str | None = None) -> Event:
    event = Event(project_id=project_id, contact_id=contact_id, name=name, data=data, email_id=email_id)
    session.add(event)
    await session.flush()
    return event


async def list_events(session: AsyncSession, project_id: str, limit: int, cursor: str | None,
                      name: str | None = None, contact_id: str | None = None) -> Page:
    stmt = select(Event).where(Event.project_id == project_id)
    if name is not None:
        stmt = stmt.where(Event.name == name)
    if contact_id is not None:
        stmt = stmt.where(Event.contact_id == contact_id)
    return await paginate(session, stmt, Event.id, limit, cursor)


async def event_names_by_frequency(session: AsyncSession, project_id: str) -> list[str]:
    count = func.count().label("n")
    stmt = (select(Event.name, count).where(Event.project_id == project_id)
            .group_by(Event.name).order_by(count.desc(), Event.name))
    return [row.name for row in await session.execute(stmt)]


async def event_counts(session: AsyncSession, project_id: str, start: datetime | None,
                       end: datetime | None) -> list[tuple[str, int]]:
    count = func.count().label("n")
    stmt = select(Event.name, count).where(Event.project_id == project_id)
    if start is not None:
        stmt = stmt.where(Event.created_at >= start)
    if end is not None:
        stmt = stmt.where(Event.created_at <= end)
    stmt = stmt.group_by(Event.name).order_by(count.desc(), Event.name)
    return [(row.name, row.n) for row in await session.execute(stmt)]


async def delete_events_named(session: AsyncSession, project_id: str, name: str) -> int:
    result = await session.execute(delete(Event).where(Event.project_id == project_id, Event.name == name))
    return result.rowcount
