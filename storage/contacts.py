"""Contact queries. Emails arrive here already lower-cased by the pipeline."""

from __future__ import annotations

from typing import Any

from sqlalchemy import delete, func, select
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.ext.asyncio import AsyncSession

from storage.models import Contact, new_id, utcnow
from storage.pagination import Page, paginate


async def get_contact(session: AsyncSession, project_id: str, contact_id: str) -> Contact | None:
    stmt = select(Contact).where(Contact.project_id == project_id, Contact.id == contact_id)
    return (await session.execute(stmt)).scalar_one_or_none()


async def get_contact_by_email(session: AsyncSession, project_id: str, email: str,
                               for_update: bool = False) -> Contact | None:
    stmt = select(Contact).where(Contact.project_id == project_id, Contact.email == email)
    if for_update:
        stmt = stmt.with_for_update()
    return (await session.execute(stmt)).scalar_one_or_none()


async def get_contacts_by_email(session: AsyncSession, project_id: str, emails: list[str]) -> dict[str, Contact]:
    stmt = select(Contact).where(Contact.project_id == project_id, Contact.email.in_(emails)).with_for_update()
    return {c.email: c for c in (await session.execute(stmt)).scalars()}


async def insert_contact(session: AsyncSession, project_id: str, email: str, subscribed: bool,
                         data: dict[str, Any]) -> Contact:
    contact = Contact(project_id=project_id, email=email, subscribed=subscribed, data=data)
    session.add(contact)
    await session.flush()
    return contact


async def get_or_create_contact(session: AsyncSession, project_id: str, email: str,
                                subscribed_if_new: bool) -> tuple[Contact, bool]:
    """Return the contact (locked for update on PostgreSQL) and whether it was just created.

    Safe against a concurrent creator: the insert does nothing on conflict and we read the winner.
    """
    contact = await get_contact_by_email(session, project_id, email, for_update=True)
    if contact is not None:
        return contact, False
    insert = pg_insert if session.bind.dialect.name == "postgresql" else sqlite_insert
    now = utcnow()
    stmt = insert(Contact).values(id=new_id(), project_id=project_id, email=email, subscribed=subscribed_if_new,
                                  data={}, created_at=now, updated_at=now)
    result = await session.execute(stmt.on_conflict_do_nothing(index_elements=["project_id", "email"]))
    contact = await get_contact_by_email(session, project_id, email, for_update=True)
    assert contact is not None
    return contact, result.rowcount == 1


async def list_contacts(session: AsyncSession, project_id: str, limit: int, cursor: str | None,
                        subscribed: bool | None = None, search: str | None = None) -> Page:
    stmt = select(Contact).where(Contact.project_id == project_id)
    if subscribed is not None:
        stmt = stmt.where(Contact.subscribed == subscribed)
    if search:
        escaped = search.lower().replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
        stmt = stmt.where(Contact.email.like(f"%{escaped}%", escape="\\"))
    return await paginate(session, stmt, Contact.id, limit, cursor)


async def count_contacts(session: AsyncSession, project_id: str) -> int:
    stmt = select(func.count()).select_from(Contact).where(Contact.project_id == project_id)
    return (await session.execute(stmt)).scalar_one()


async def delete_contact(session: AsyncSession, project_id: str, contact_id: str) -> None:
    await session.execute(delete(Contact).where(Contact.project_id == project_id, Contact.id == contact_id))
