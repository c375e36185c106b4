"""Events (seed 004): list, names, stats, per contact, delete by name."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from aiohttp import web

from api.context import DB
from api.envelope import success
from api.routing import Route, caller
from api.schemas import DeletedEvents, EventPage, EventStats
from api.serialize import event_json, page_json
from api.validation import NO_NUL, PAGE_QUERY, page_params, text_param
from pipeline.contacts import is_system_event, require_contact
from pipeline.errors import FieldError, Forbidden, NotFound, ValidationFailed
from pipeline.marketing.segments import check_event_deletable
from pipeline.workflows.rules import check_event_unused
from storage import events as event_store

MAX_EVENT_NAME = 200
DATE_QUERY = {"type": "string", "format": "date-time"}
NAME_QUERY = {"type": "string", "maxLength": MAX_EVENT_NAME, "pattern": NO_NUL}


def plunk_name(schema: dict[str, Any], name: str) -> dict[str, Any]:
    return {**schema, "description": f"Plunk's name for `{name}` (give one of them)"}


def _aliased(request: web.Request, name: str, alias: str) -> str:
    """Which of `name` and Plunk's own name for it (`alias`, what Plunk's dashboard API reads) the caller
    gave; both is a 422."""
    if name in request.query and alias in request.query:
        raise ValidationFailed([FieldError(alias, f"Give {name} or {alias}, not both", "conflicting_parameters")])
    return alias if alias in request.query else name


def _date_param(request: web.Request, name: str, alias: str) -> datetime | None:
    name = _aliased(request, name, alias)
    raw = request.query.get(name)
    if raw is None:
        return None
    try:
        value = datetime.fromisoformat(raw.replace("Z", "+00:00"))
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
    except (ValueError, OverflowError):
        raise ValidationFailed([FieldError(name, f"{name} must be an ISO 8601 date-time between years 1 and "
                                                 "9999 in UTC", "invalid_date")]) from None


async def list_events(request: web.Request) -> web.Response:
    limit, cursor = page_params(request)
    name = text_param(request, _aliased(request, "name", "eventName"), MAX_EVENT_NAME)
    page = await request.app[DB].read(event_store.list_events, caller(request).project_id, limit, cursor, name)
    return success(page_json(page, event_json))


async def event_names(request: web.Request) -> web.Response:
    names = await request.app[DB].read(event_store.event_names_by_frequency, caller(request).project_id)
    return success(names)


async def event_stats(request: web.Request) -> web.Response:
    start, end = _date_param(request, "start", "startDate"), _date_param(request, "end", "endDate")
    if start and end and start > end:
        raise ValidationFailed([FieldError("start", "start must be before end", "invalid_date")])
    counts = await request.app[DB].read(event_store.event_counts, caller(request).project_id, start, end)
    return success({"total": sum(n for _, n in counts), "start": start, "end": end,
                    "events": [{"name": name, "count": n} for name, n in counts]})


async def contact_events(request: web.Request) -> web.Response:
    limit, cursor = page_params(request)
    project_id = caller(request).project_id
    contact_id = request.match_info["contactId"]

    def query(session):
        contact = require_contact(session, project_id, contact_id)
        return event_store.list_events(session, project_id, limit, cursor, contact_id=contact.id)

    page = await request.app[DB].read(query)
    return success(page_json(page, event_json))


async def delete_events(request: web.Request) -> web.Response:
    name = request.match_info["eventName"]
    if is_system_event(name):
        raise Forbidden(f"'{name}' is a system event and cannot be deleted",
                        "Only events your application tracked can be deleted.")
    project_id = caller(request).project_id

    def delete(session, limit: int) -> int:
        """A part of the deletion, the uses checked again in each (a segment or workflow that comes to use the
        name meanwhile stops the rest with its 409): deleting a million events in one transaction held every
        other write on SQLite's one writer until it committed (0.6 s for 100,000)."""
        check_event_deletable(session, project_id, name)
        check_event_unused(session, project_id, name)
        return event_store.delete_events_named(session, project_id, name, limit)

    deleted = await request.app[DB].write_in_chunks(delete)
    if not deleted:
        raise NotFound(f"No events named '{name}'")
    return success({"name": name, "deleted": deleted})


ROUTES = [
    Route("GET", "/events", list_events, "List events, newest first",
          query={"name": NAME_QUERY, "eventName": plunk_name(NAME_QUERY, "name"), **PAGE_QUERY},
          tag="Events", response=EventPage, legacy="items"),
    Route("GET", "/events/names", event_names, "Event names by frequency", tag="Events", response=list[str]),
    Route("GET", "/events/stats", event_stats, "Event counts by name in a date window",
          query={"start": DATE_QUERY, "end": DATE_QUERY, "startDate": plunk_name(DATE_QUERY, "start"),
                 "endDate": plunk_name(DATE_QUERY, "end")}, tag="Events", response=EventStats),
    Route("GET", "/events/contact/{contactId}", contact_events, "Events of one contact", query=PAGE_QUERY,
          tag="Events", response=EventPage, legacy="items"),
    Route("DELETE", "/events/{eventName}", delete_events,
          "Delete every event with this name (not while a segment or a workflow uses it)", tag="Events",
          response=DeletedEvents, errors=frozenset({409})),
]
