"""Contact rules shared by track, send and the contacts API: data merging and subscription changes."""

from __future__ import annotations

import re
from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession

from pipeline.errors import Conflict, FieldError, NotFound, ValidationFailed
from storage import contacts as contact_store
from storage import events as event_store
from storage.models import Contact

RESERVED_DATA_KEYS = frozenset({
    "id", "email", "subscribed", "createdAt", "updatedAt", "created_at", "updated_at",
    "projectId", "project_id", "plunk_id", "plunk_email",
})
SYSTEM_EVENT = re.compile(
    r"^(email\..*|contact\.subscribed|contact\.unsubscribed|segment\.[^.]+\.(entry|exit))$")


def is_system_event(name: str) -> bool:
    return bool(SYSTEM_EVENT.match(name))


def is_one_shot(value: Any) -> bool:
    return isinstance(value, dict) and set(value) == {"value", "persistent"} and value["persistent"] is False


def merge_data(stored: dict[str, Any], incoming: dict[str, Any] | None) -> tuple[dict[str, Any], dict[str, Any]]:
    """Apply seed 003's rules; return (the contact's new data, the variables this call carries).

    Reserved keys are dropped, `""` is ignored, `null` deletes the key, `{value, persistent: false}`
    is a one-shot variable (in the returned variables, never stored), anything else is stored.
    """
    merged = dict(stored)
    variables: dict[str, Any] = {}
    for key, value in (incoming or {}).items():
        if key in RESERVED_DATA_KEYS or value == "":
            continue
        if value is None:
            merged.pop(key, None)
        elif is_one_shot(value):
            variables[key] = value["value"]
        else:
            if isinstance(value, dict) and set(value) == {"value", "persistent"}:
                value = value["value"]
            merged[key] = value
            variables[key] = value
    return merged, variables


async def record_subscription(session: AsyncSession, contact: Contact, subscribed: bool) -> bool:
    """Set the contact's state; a real change records contact.subscribed / contact.unsubscribed."""
    if contact.subscribed == subscribed:
        return False
    contact.subscribed = subscribed
    name = "contact.subscribed" if subscribed else "contact.unsubscribed"
    await event_store.insert_event(session, contact.project_id, contact.id, name, {})
    return True


async def upsert_contact(session: AsyncSession, project_id: str, email: str, subscribed: bool | None,
                         default_subscribed: bool, data: dict[str, Any] | None = None,
                         only_subscribe: bool = False) -> tuple[Contact, dict[str, Any], bool]:
    """The one upsert used by track and send. Returns (contact, call variables, created).

    A new contact gets `subscribed` or the caller's default. An existing one changes state only
    on an explicit value; with `only_subscribe` (the send rule) only an explicit `true` counts.
    """
    contact, created = await contact_store.get_or_create_contact(
        session, project_id, email, default_subscribed if subscribed is None else subscribed)
    merged, variables = merge_data(contact.data or {}, data)
    if merged != contact.data:
        contact.data = merged
    if not created and subscribed is not None and (subscribed or not only_subscribe):
        await record_subscription(session, contact, subscribed)
    return contact, variables, created


async def require_contact(session: AsyncSession, project_id: str, contact_id: str) -> Contact:
    contact = await contact_store.get_contact(session, project_id, contact_id)
    if contact is None:
        raise NotFound(f"Contact {contact_id} not found",
                       "Check the contact id; it must belong to this project.")
    return contact


async def create_contact(session: AsyncSession, project_id: str, email: str, subscribed: bool,
                         data: dict[str, Any] | None) -> Contact:
    if await contact_store.get_contact_by_email(session, project_id, email) is not None:
        raise Conflict(f"A contact with email {email} already exists",
                       "Update the existing contact with PUT /contacts instead.")
    stored, _ = merge_data({}, data)
    return await contact_store.insert_contact(session, project_id, email, subscribed, stored)


async def update_contact(session: AsyncSession, project_id: str, contact_id: str, email: str | None,
                         subscribed: bool | None, data: dict[str, Any] | None) -> Contact:
    contact = await require_contact(session, project_id, contact_id)
    if email is not None and email != contact.email:
        if await contact_store.get_contact_by_email(session, project_id, email) is not None:
            raise Conflict(f"A contact with email {email} already exists",
                           "Each email can belong to only one contact in a project.")
        contact.email = email
    if data is not None:
        merged, _ = merge_data(contact.data or {}, data)
        contact.data = merged
    if subscribed is not None:
        await record_subscription(session, contact, subscribed)
    await session.flush()
    return contact


async def set_subscribed(session: AsyncSession, project_id: str, contact_id: str | None, email: str | None,
                         subscribed: bool) -> Contact:
    if contact_id is not None:
        contact = await require_contact(session, project_id, contact_id)
    else:
        contact = await contact_store.get_contact_by_email(session, project_id, email or "")
        if contact is None:
            raise NotFound(f"Contact {email} not found", "Check the email; it must belong to this project.")
    await record_subscription(session, contact, subscribed)
    await session.flush()
    return contact


async def delete_contact(session: AsyncSession, project_id: str, contact_id: str) -> Contact:
    contact = await require_contact(session, project_id, contact_id)
    await contact_store.delete_contact(session, project_id, contact_id)
    return contact


def reserved_event_error(name: str) -> ValidationFailed:
    return ValidationFailed(
        [FieldError("event", f"'{name}' is a reserved event name emitted by plunkd itself", "reserved_event")],
        suggestion="Pick an event name that does not start with email., contact.subscribed/unsubscribed "
                   "or segment.<slug>.entry/exit.")
