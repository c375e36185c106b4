"""POST /v1/track: upsert the contact, merge its data, record the event."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy.orm import Session

from pipeline.contacts import is_system_event, reserved_event_error, upsert_contact
from pipeline.events import record_event


@dataclass
class Tracked:
    contact_id: str
    event_id: str
    timestamp: datetime


def check_event_name(name: str) -> None:
    if is_system_event(name):
        raise reserved_event_error(name)


def track(session: Session, project_id: str, email: str, event: str, subscribed: bool | None,
                data: dict[str, Any] | None) -> Tracked:
    """Seed 003: new contacts default to subscribed; every call records a new event."""
    check_event_name(event)
    contact, variables, _ = upsert_contact(session, project_id, email, subscribed, True, data, refresh=False)
    event_id, created_at = record_event(session, project_id, contact.id, event, variables, refresh_segments=True)
    return Tracked(contact.id, event_id, created_at)
