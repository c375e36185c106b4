"""Segments: list, create, get (with a count), update, delete, their contacts and their count.

The condition tree is parsed by the models of `pipeline.marketing.segments` (`validate_condition`; errors name the
path inside the tree, e.g. `condition.all.1.op`), which also describe it in /openapi.json
(SegmentCondition): what JSON schema cannot say (at most 10 levels and 200 nodes) is listed in
tests/schemathesis.toml.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

from aiohttp import web
from pydantic import Field, StringConstraints

from api.context import DB
from api.envelope import success
from api.routing import Route, caller
from api.schemas import ContactPage, Count, Out
from api.serialize import contact_json, page_json
from api.validation import PAGE_QUERY, Body, page_params, read_body
from pipeline.marketing import segments as rules
from storage import segments as segment_store
from storage.models import utcnow

Condition = Annotated[dict[str, Any], rules.ConditionObject]
SegmentName = Annotated[str, StringConstraints(min_length=1, max_length=rules.MAX_NAME)]


class CreateSegmentBody(Body):
    name: SegmentName
    condition: Condition
    trackMembership: bool = False


class UpdateSegmentBody(Body):
    name: SegmentName | None = None
    condition: Condition | None = None
    trackMembership: bool | None = None


class SegmentOut(Out):
    id: str
    name: str
    slug: str = Field(description="From the name; names the segment.<slug>.entry / .exit events")
    condition: rules.SegmentCondition
    trackMembership: bool
    createdAt: datetime
    updatedAt: datetime


class SegmentDetail(SegmentOut):
    count: int = Field(ge=0, description="Contacts the condition matches now, subscribed or not")


class SegmentPage(Out):
    items: list[SegmentOut]
    nextCursor: str | None
    hasMore: bool
    total: int = Field(ge=0)


def segment_json(segment: Any) -> dict[str, Any]:
    return {"id": segment.id, "name": segment.name, "slug": segment.slug, "condition": segment.condition,
            "trackMembership": segment.track_membership, "createdAt": segment.created_at,
            "updatedAt": segment.updated_at}


# ---------------------------------------------------------------------------------------------------
# Handlers.

async def list_segments(request: web.Request) -> web.Response:
    limit, cursor = page_params(request)
    page = await request.app[DB].read(segment_store.list_segments, caller(request).project_id, limit, cursor)
    return success(page_json(page, segment_json))


async def create_segment(request: web.Request) -> web.Response:
    body = await read_body(request, CreateSegmentBody)
    rules.validate_condition(body.condition)
    project_id = caller(request).project_id
    segment = await request.app[DB].write(
        lambda s: rules.create_segment(s, project_id, body.name, body.condition, body.trackMembership))
    return success(segment_json(segment))


async def get_segment(request: web.Request) -> web.Response:
    project_id, segment_id = caller(request).project_id, request.match_info["id"]

    def query(session):
        segment = rules.require_segment(session, project_id, segment_id)
        return segment, segment_store.count_matching(session, project_id, segment.condition, utcnow())

    segment, count = await request.app[DB].read(query)
    return success({**segment_json(segment), "count": count})


async def update_segment(request: web.Request) -> web.Response:
    body = await read_body(request, UpdateSegmentBody)
    if body.condition is not None:
        rules.validate_condition(body.condition)
    project_id, segment_id = caller(request).project_id, request.match_info["id"]
    segment = await request.app[DB].write(lambda s: rules.update_segment(
        s, project_id, segment_id, body.name, body.condition, body.trackMembership))
    return success(segment_json(segment))


async def delete_segment(request: web.Request) -> web.Response:
    project_id, segment_id = caller(request).project_id, request.match_info["id"]
    segment = await request.app[DB].write(lambda s: rules.delete_segment(s, project_id, segment_id))
    return success(segment_json(segment))


async def segment_contacts(request: web.Request) -> web.Response:
    limit, cursor = page_params(request)
    project_id, segment_id = caller(request).project_id, request.match_info["id"]

    def query(session):
        segment = rules.require_segment(session, project_id, segment_id)
        return segment_store.list_matching(session, project_id, segment.condition, utcnow(), limit, cursor)

    page = await request.app[DB].read(query)
    return success(page_json(page, contact_json))


async def count_segment(request: web.Request) -> web.Response:
    project_id, segment_id = caller(request).project_id, request.match_info["id"]

    def query(session):
        segment = rules.require_segment(session, project_id, segment_id)
        return segment_store.count_matching(session, project_id, segment.condition, utcnow())

    return success({"count": await request.app[DB].read(query)})


ROUTES = [
    Route("GET", "/segments", list_segments, "List segments, newest first", query=PAGE_QUERY, tag="Segments",
          response=SegmentPage, legacy="items"),
    Route("POST", "/segments", create_segment, "Create a segment", body=CreateSegmentBody, tag="Segments",
          status=201, response=SegmentOut, errors=frozenset({409})),
    Route("GET", "/segments/{id}", get_segment, "Get a segment and how many contacts it matches",
          tag="Segments", response=SegmentDetail),
    Route("PATCH", "/segments/{id}", update_segment, "Update a segment", body=UpdateSegmentBody, tag="Segments",
          response=SegmentOut, errors=frozenset({409})),
    Route("DELETE", "/segments/{id}", delete_segment, "Delete a segment (not while a campaign uses it)",
          tag="Segments", response=SegmentOut, errors=frozenset({409})),
    Route("GET", "/segments/{id}/contacts", segment_contacts,
          "Contacts the segment matches, subscribed or not, newest first", query=PAGE_QUERY, tag="Segments",
          response=ContactPage, legacy="items"),
    Route("GET", "/segments/{id}/count", count_segment, "How many contacts the segment matches", tag="Segments",
          response=Count, legacy="bare"),
]
