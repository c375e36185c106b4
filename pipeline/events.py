"""Recording an event and what it sets off: the one way every path (track, contacts, tracking links, the
dispatcher's `email.sent`, delivery feedback, segment moves) records an event.

`record_event` writes, in the caller's transaction, the event row, the workflow runs it starts, the waiting
runs it resumes, and one webhook delivery per enabled endpoint listening for it; so an event that commits
has all of them and one that rolls back has none. `storage/` holds the statements; the rules (which event
starts or resumes runs, which endpoint receives it, the body it is posted with) are here.

On the hot path (every track, every sent email) a project with no workflow or endpoint listening for an
event costs two dictionary lookups (`storage.interest.ProjectInterest`).
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy.orm import Session

from pipeline.marketing.segments import membership_moves
from storage import contacts as contact_store
from storage import events as event_store
from storage import webhooks as webhook_store
from storage import workflows as workflow_store
from storage.models import iso

WILDCARDS = {"*": "", "email.*": "email.", "contact.*": "contact.", "segment.*": "segment."}
"""Patterns an endpoint may listen for, besides exact event names: each matches the names it starts with."""


def patterns_for(name: str) -> frozenset[str]:
    """What an endpoint's `events` must hold to receive event `name`: the name or a pattern matching it."""
    return frozenset([name, *(pattern for pattern, prefix in WILDCARDS.items() if name.startswith(prefix))])


def event_payload(event_id: str | None, name: str, contact: dict[str, str | None] | None, email_id: str | None,
                  data: dict[str, Any], at: datetime) -> dict[str, Any]:
    """The JSON body every webhook attempt POSTs (see docs/api.md): `{type, timestamp, data: {event, name,
    contact, email, data}}`."""
    return {"type": name, "timestamp": iso(at),
            "data": {"event": event_id, "name": name, "contact": contact, "email": email_id, "data": data}}


def record_event(session: Session, project_id: str, contact_id: str | None, name: str, data: dict[str, Any],
                 email_id: str | None = None, refresh_segments: bool = False) -> tuple[str, datetime]:
    """Record an event and what it sets off, in the caller's transaction; return the event's id and time.

    A contact's event starts the runs of the enabled workflows it triggers and resumes the contact's runs
    waiting for it; every event queues a delivery for each enabled endpoint listening for it.
    `refresh_segments`: the event comes with a change of the contact (track, a subscription change), so its
    tracked segments are evaluated afterwards (`refresh_segments` below)."""
    event_id, now = event_store.insert_event(session, project_id, contact_id, name, data, email_id)
    if contact_id is not None:
        _start_and_resume_runs(session, project_id, contact_id, name, event_id, data, now)
    _queue_webhooks(session, project_id, contact_id, name, event_id, data, email_id, now)
    if refresh_segments and contact_id is not None:
        refresh_segment_membership(session, project_id, contact_id)
    return event_id, now


def refresh_segment_membership(session: Session, project_id: str, contact_id: str) -> None:
    """Re-evaluate the contact's tracked segments and record `segment.<slug>.entry` / `.exit` for each move
    (a cache lookup when the project tracks no segment). Call after a change of the contact's data or
    subscription."""
    for move in membership_moves(session, project_id, contact_id):
        record_event(session, project_id, contact_id, move.event_name, {"segmentId": move.segment_id})


def _start_and_resume_runs(session: Session, project_id: str, contact_id: str, name: str, event_id: str,
                           data: dict[str, Any], now: datetime) -> None:
    wanted = workflow_store.interest(session, project_id)
    if name in wanted.triggers:
        workflow_store.start_runs(session, project_id, contact_id, name, event_id, data, now)
    if name in wanted.waits:
        workflow_store.resume_waiting(session, contact_id, name, now)


def _queue_webhooks(session: Session, project_id: str, contact_id: str | None, name: str, event_id: str,
                    data: dict[str, Any], email_id: str | None, now: datetime) -> int:
    """One PENDING delivery, due now, per enabled endpoint of the project listening for `name` (its name or
    a pattern matching it). Returns how many were queued."""
    wanted = webhook_store.interest(session, project_id)
    if not wanted:
        return 0
    matching = patterns_for(name)
    if wanted.isdisjoint(matching):
        return 0
    endpoint_ids = webhook_store.listening_endpoints(session, project_id, matching)
    if not endpoint_ids:
        return 0
    contact = None
    if contact_id is not None:  # a batch's contacts are its records: one created in it is written at commit
        record = contact_store.get_contact(session, project_id, contact_id)
        contact = {"id": contact_id, "email": None if record is None else record.email}
    payload = event_payload(event_id, name, contact, email_id, data or {}, now)
    for endpoint_id in endpoint_ids:
        webhook_store.queue_delivery(session, endpoint_id, event_id, name, payload, now)
    return len(endpoint_ids)
