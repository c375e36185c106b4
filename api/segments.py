"""Segments: list, create, get (with a count), update, delete, their contacts and their count.

The condition tree is validated by `pipeline.segments.validate_condition` (errors name the path inside
the tree, e.g. `condition.all.1.op`). The pydantic models below only describe the tree in
/openapi.json, as exactly as JSON schema can: what it cannot say (at most 10 levels and 200 nodes) is
listed in tests/schemathesis.toml.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from aiohttp import web
from pydantic import ConfigDict, Field, StringConstraints, TypeAdapter, WithJsonSchema
from typing_extensions import TypeAliasType

from api.context import DB
from api.envelope import success
from api.routing import Route, caller
from api.schemas import ContactPage, Count, Out
from api.serialize import contact_json, page_json
from api.validation import NO_NUL, PAGE_QUERY, Body, page_params, read_body
from pipeline import segments as rules
from storage import segments as segment_store
from storage.models import utcnow

# ---------------------------------------------------------------------------------------------------
# The condition tree, for /openapi.json (validation is pipeline.segments.validate_condition).

_TEXT = {"type": "string", "maxLength": rules.MAX_TEXT, "pattern": NO_NUL}
_NUMBER = {"type": "number", "minimum": -rules.MAX_NUMBER, "maximum": rules.MAX_NUMBER}
_DATE = {"anyOf": [{"type": "string", "format": "date"}, {"type": "string", "format": "date-time"}],
         "description": "ISO 8601: a date (midnight UTC) or a date-time with its offset"}
Text = Annotated[str, WithJsonSchema(_TEXT)]
Number = Annotated[float, WithJsonSchema(_NUMBER)]
DateValue = Annotated[str, WithJsonSchema(_DATE)]
Scalar = Annotated[str | float | bool, WithJsonSchema({"anyOf": [_TEXT, _NUMBER, {"type": "boolean"}]})]
DataField = Annotated[str, WithJsonSchema({
    "type": "string", "pattern": f"^data\\.[^\\u0000]{{1,{rules.MAX_DATA_KEY}}}$",
    "description": "data.<key>: a top-level key of the contact's data"})]
EventName = Annotated[str, WithJsonSchema({"type": "string", "minLength": 1, "maxLength": rules.MAX_EVENT_NAME,
                                           "pattern": "^[^\\u0000]*\\S[^\\u0000]*$"})]
AtLeast = Annotated[int, WithJsonSchema({"type": "integer", "minimum": 1, "maximum": rules.MAX_AT_LEAST,
                                         "default": 1})]
WithinDays = Annotated[int, WithJsonSchema({"type": "integer", "minimum": 1, "maximum": rules.MAX_WITHIN_DAYS})]


class _Node(Out):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


SegmentCondition = TypeAliasType(
    "SegmentCondition",
    "SegmentAll | SegmentAny | SegmentNot | SegmentEmailTest | SegmentSubscribedTest | SegmentTimestampTest "
    "| SegmentDataTextTest | SegmentDataMatchTest | SegmentDataPresenceTest | SegmentDataNumberTest "
    "| SegmentDataDateTest | SegmentEventDid | SegmentEventDidNot")


class SegmentAll(_Node):
    """Every condition matches (an empty list matches every contact)."""

    all: list[SegmentCondition]


class SegmentAny(_Node):
    """Some condition matches (an empty list matches none)."""

    any: list[SegmentCondition]


class SegmentNot(_Node):
    not_: SegmentCondition = Field(alias="not")


class SegmentEmailTest(_Node):
    """The contact's (lower-case) email; the value is compared lower-cased."""

    field: Literal["email"]
    op: rules.TextOp
    value: Text


class SegmentSubscribedTest(_Node):
    field: Literal["subscribed"]
    op: rules.MatchOp
    value: bool


class SegmentTimestampTest(_Node):
    field: rules.TimestampField
    op: rules.DateOp
    value: DateValue


class SegmentDataTextTest(_Node):
    """A string in the contact's data: exact, case-sensitive comparison."""

    field: DataField
    op: rules.TextOp
    value: Text


class SegmentDataMatchTest(_Node):
    field: DataField
    op: rules.MatchOp
    value: Scalar


class SegmentDataPresenceTest(_Node):
    """The key holds a value other than null."""

    field: DataField
    op: rules.PresenceOp


class SegmentDataNumberTest(_Node):
    field: DataField
    op: rules.NumberOp
    value: Number


class SegmentDataDateTest(_Node):
    """A date stored as text in the data, compared as text with the value in UTC
    (`YYYY-MM-DDTHH:MM:SS.mmmZ`, JavaScript's toISOString)."""

    field: DataField
    op: rules.DateOp
    value: DateValue


class SegmentEventDid(_Node):
    """The contact has at least `atLeast` events of this name (in the last `withinDays` days)."""

    event: EventName
    op: Literal["did"]
    atLeast: AtLeast = 1
    withinDays: WithinDays | None = None


class SegmentEventDidNot(_Node):
    """The contact has no event of this name (in the last `withinDays` days)."""

    event: EventName
    op: Literal["didNot"]
    withinDays: WithinDays | None = None


for _model in (SegmentAll, SegmentAny, SegmentNot):
    _model.model_rebuild()


class _ConditionSchema:
    """A body field validated as a plain object (by pipeline.segments) and described as SegmentCondition."""

    @classmethod
    def __get_pydantic_json_schema__(cls, core_schema: Any, handler: Any) -> Any:
        return handler(TypeAdapter(SegmentCondition).core_schema)


Condition = Annotated[dict[str, Any], _ConditionSchema]
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
    condition: SegmentCondition
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
    return success(segment_json(segment), status=201)


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
