"""POST /v1/track."""

from __future__ import annotations

from typing import Annotated

from aiohttp import web
from pydantic import StringConstraints, WithJsonSchema

from api.context import DB
from api.envelope import success
from api.routing import Route, caller
from api.schemas import Tracked
from api.validation import Body, Data, Email, read_body
from pipeline.contacts import SYSTEM_EVENT
from pipeline.track import check_event_name, track
from storage.contacts import ContactWork

EventName = Annotated[str, StringConstraints(min_length=1, max_length=200, strip_whitespace=True),
                      WithJsonSchema({"type": "string", "minLength": 1, "maxLength": 200,
                                      "pattern": "^[^\\u0000]*\\S[^\\u0000]*$",
                                      "not": {"pattern": SYSTEM_EVENT.pattern}})]


class TrackBody(Body):
    email: Email
    event: EventName
    subscribed: bool | None = None
    data: Data = None


async def track_event(request: web.Request) -> web.Response:
    body = await read_body(request, TrackBody)
    check_event_name(body.event)
    project_id = caller(request).project_id
    result = await request.app[DB].write(ContactWork(
        lambda session: track(session, project_id, body.email, body.event, body.subscribed, body.data),
        [(project_id, body.email)]), light=True)
    return success({"contact": result.contact_id, "event": result.event_id, "timestamp": result.timestamp})


ROUTES = [
    Route("POST", "/track", track_event, "Track an event for a contact (creates or updates the contact)",
          auth="public", scope="public", body=TrackBody, tag="Events", response=Tracked, cors=True),
]
