"""Queries behind the signed contact links (unsubscribe, subscribe, preferences pages).

A link names a contact by id alone (its token carries no project), so the contact is found by its
primary key and brings its project with it.
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import bindparam, select
from sqlalchemy.orm import Session

from storage.contacts import ContactRecord
from storage.models import Contact, Email, Project

_CONTACT = Contact.__table__
_PROJECT = Project.__table__
_EMAIL = Email.__table__
_CONTACT_COLUMNS = [_CONTACT.c[name] for name in ("id", "email", "subscribed", "data", "created_at", "updated_at")]
_LINKED = (select(_CONTACT.c.project_id, _PROJECT.c.name, _PROJECT.c.from_name, *_CONTACT_COLUMNS)
           .join(_PROJECT, _PROJECT.c.id == _CONTACT.c.project_id)
           .where(_CONTACT.c.id == bindparam("i")))
_LINKED_LOCKED = _LINKED.with_for_update(of=_CONTACT, key_share=True)
"""FOR NO KEY UPDATE, as `storage.contacts` locks contacts: a click does not wait for every transaction holding a
row that references the contact (a campaign's chunk of emails)."""
_CAMPAIGN_EMAIL = select(_EMAIL.c.id).where(_EMAIL.c.campaign_id == bindparam("campaign"),
                                            _EMAIL.c.contact_id == bindparam("contact"))


@dataclass
class LinkedContact:
    project_id: str
    project_name: str
    sender_name: str
    """The project's default From name ('' when unset): whom the page says the mail comes from."""
    contact: ContactRecord


def contact_for_link(session: Session, contact_id: str, for_update: bool = False) -> LinkedContact | None:
    """The contact a link names, with its project; None when it was deleted. `for_update` locks the
    contact's row (PostgreSQL) so two clicks at once record one change."""
    row = session.connection().execute(_LINKED_LOCKED if for_update else _LINKED, {"i": contact_id}).first()
    if row is None:
        return None
    project_id, name, from_name, *contact = row
    return LinkedContact(project_id, name, from_name or "", ContactRecord(*contact))


def campaign_email_id(session: Session, campaign_id: str, contact_id: str) -> str | None:
    """The email a campaign sent to a contact (at most one: unique on (campaign_id, contact_id)), or None
    when it never existed or retention has deleted its row."""
    return session.connection().execute(_CAMPAIGN_EMAIL, {"campaign": campaign_id, "contact": contact_id}).scalar()
