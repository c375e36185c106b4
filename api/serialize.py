"""Row → JSON shapes used in replies."""

from __future__ import annotations

from typing import Any

from storage.contacts import ContactRecord
from storage.models import Event
from storage.pagination import Page


def contact_json(contact: ContactRecord) -> dict[str, Any]:
    return {"id": contact.id, "email": contact.email, "subscribed": contact.subscribed,
            "data": contact.data or {}, "createdAt": contact.created_at, "updatedAt": contact.updated_at}


def event_json(event: Event) -> dict[str, Any]:
    return {"id": event.id, "name": event.name, "contactId": event.contact_id, "emailId": event.email_id,
            "data": event.data or {}, "createdAt": event.created_at}


def page_json(page: Page, item_json) -> dict[str, Any]:
    return {"items": [item_json(i) for i in page.items], "nextCursor": page.next_cursor,
            "hasMore": page.has_more, "total": page.total}
