"""Contact rules shared by track, send and the contacts API: data merging and subscription changes."""

from __future__ import annotations

import re
from typing import Any

from sqlalchemy.orm import Session

from pipeline.errors import Conflict, FieldError, NotFound, ValidationFailed
from pipeline.events import record_event, refresh_segment_membership
from storage import contacts as contact_store
from storage.contacts import ContactRecord
from storage.db import Database

RESERVED_DATA_KEYS = frozenset({
    "id", "email", "subscribed", "createdAt", "updatedAt", "created_at", "updated_at",
    "projectId", "project_id", "plunk_id", "plunk_email",
})
SYSTEM_EVENT = re.compile(
    r"^(email\..*|contact\.subscribed|contact\.unsubscribed|segment\.[^.]+\.(entry|exit)"
    r"|domain\.(verified|unverified)|campaign\.paused|reputation\.(warning|paused))$")
"""Names only plunkd records (`/v1/track` refuses them): a client could otherwise forge a domain's or the
reputation guard's events to the project's webhooks."""


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


def record_subscription(session: Session, project_id: str, contact: ContactRecord, subscribed: bool,
                        event_data: dict[str, Any] | None = None, email_id: str | None = None,
                        refresh: bool = True) -> bool:
    """Set the contact's state; a real change records contact.subscribed / contact.unsubscribed (with
    `event_data`, and `email_id` when the change came from a link in that email) and, unless the caller
    will (`refresh=False`), re-evaluates the contact's tracked segments."""
    if contact.subscribed == subscribed:
        return False
    contact.subscribed = subscribed
    contact_store.update_contact(session, contact.id, subscribed=subscribed)
    name = "contact.subscribed" if subscribed else "contact.unsubscribed"
    record_event(session, project_id, contact.id, name, event_data or {}, email_id=email_id, refresh_segments=refresh)
    return True


def upsert_contact(session: Session, project_id: str, email: str, subscribed: bool | None,
                   default_subscribed: bool, data: dict[str, Any] | None = None,
                   only_subscribe: bool = False, refresh: bool = True) -> tuple[ContactRecord, dict[str, Any], bool]:
    """The one upsert used by track, send and import. Returns (contact, call variables, created).

    A new contact gets `subscribed` or the caller's default. An existing one changes state only
    on an explicit value; with `only_subscribe` (the send rule) only an explicit `true` counts.
    A change re-evaluates the contact's tracked segments, unless the caller will (`refresh=False`).
    """
    initial, variables = merge_data({}, data)
    contact, created = contact_store.get_or_create_contact(
        session, project_id, email, default_subscribed if subscribed is None else subscribed, initial)
    merged = initial
    if not created:
        merged, variables = merge_data(contact.data or {}, data)
    changed = created
    if merged != contact.data:
        contact.data = merged
        contact_store.update_contact(session, contact.id, data=merged)
        changed = True
    if not created and subscribed is not None and (subscribed or not only_subscribe):
        changed = record_subscription(session, project_id, contact, subscribed, refresh=False) or changed
    if changed and refresh:
        refresh_segment_membership(session, project_id, contact.id)
    return contact, variables, created


def require_contact(session: Session, project_id: str, contact_id: str) -> ContactRecord:
    contact = contact_store.get_contact(session, project_id, contact_id)
    if contact is None:
        raise NotFound(f"Contact {contact_id} not found",
                       "Check the contact id; it must belong to this project.")
    return contact


def create_contact(session: Session, project_id: str, email: str, subscribed: bool,
                   data: dict[str, Any] | None) -> ContactRecord:
    if contact_store.get_contact_by_email(session, project_id, email) is not None:
        raise Conflict(f"A contact with email {email} already exists",
                       "Update the existing contact with PUT /contacts instead.")
    stored, _ = merge_data({}, data)
    contact = contact_store.insert_contact(session, project_id, email, subscribed, stored)
    refresh_segment_membership(session, project_id, contact.id)
    return contact


def update_contact(session: Session, project_id: str, contact_id: str, email: str | None,
                   subscribed: bool | None, data: dict[str, Any] | None) -> ContactRecord:
    contact = require_contact(session, project_id, contact_id)
    if email is not None and email != contact.email:
        if contact_store.get_contact_by_email(session, project_id, email) is not None:
            raise Conflict(f"A contact with email {email} already exists",
                           "Each email can belong to only one contact in a project.")
        contact_store.update_contact(session, contact.id, email=email)
    if data is not None:
        merged, _ = merge_data(contact.data or {}, data)
        contact_store.update_contact(session, contact.id, data=merged)
    if subscribed is not None:
        record_subscription(session, project_id, contact, subscribed, refresh=False)
    refresh_segment_membership(session, project_id, contact.id)
    return require_contact(session, project_id, contact_id)


def set_subscribed(session: Session, project_id: str, contact_id: str | None, email: str | None,
                   subscribed: bool) -> ContactRecord:
    contact: ContactRecord | None
    if contact_id is not None:
        contact = require_contact(session, project_id, contact_id)
    else:
        contact = contact_store.get_contact_by_email(session, project_id, email or "")
        if contact is None:
            raise NotFound(f"Contact {email} not found", "Check the email; it must belong to this project.")
    record_subscription(session, project_id, contact, subscribed)
    return require_contact(session, project_id, contact.id)


def delete_contact(session: Session, project_id: str, contact_id: str) -> ContactRecord:
    contact = require_contact(session, project_id, contact_id)
    contact_store.delete_contact(session, project_id, contact_id)
    return contact


async def delete(db: Database, project_id: str, contact_id: str) -> ContactRecord:
    """`delete_contact`, its events deleted and its emails unlinked first, a thousand per transaction (each time
    the contact is looked up again: 404 for one of another project, or gone): in the DELETE's own transaction,
    the foreign keys' CASCADE and SET NULL for a contact with 100,000 events held every other write on SQLite for
    0.65 s. Those that come meanwhile go with the contact."""
    def detach(session: Session, limit: int) -> int:
        require_contact(session, project_id, contact_id)
        return contact_store.detach_rows(session, contact_id, limit)

    await db.write_in_chunks(detach)
    return await db.write(lambda s: delete_contact(s, project_id, contact_id))


def reserved_event_error(name: str) -> ValidationFailed:
    return ValidationFailed(
        [FieldError("event", f"'{name}' is a reserved event name emitted by plunkd itself", "reserved_event")],
        suggestion="Pick an event name that does not start with email., contact.subscribed/unsubscribed "
                   "or segment.<slug>.entry/exit.")
