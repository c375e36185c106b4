"""Campaigns: the Plunk dashboard shape (unversioned: /campaigns/:id/send, /cancel, /test, /stats) and
the seed-002 shape (PUT/DELETE /campaigns with the id in the body, POST /campaigns/send with `live` and
`delay`), from the same rules in `pipeline.marketing.campaigns`."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Annotated, Any, Literal

from aiohttp import web
from pydantic import AwareDatetime, ConfigDict, Field, StringConstraints, WithJsonSchema, field_validator
from pydantic_core import PydanticCustomError

from api.context import CONFIG, DB, LINKS, ON_QUEUED
from api.envelope import success
from api.routing import Route, caller
from api.schemas import Out
from api.send import HeaderEmail, HeaderText
from api.serialize import page_json
from api.validation import NO_NUL, PAGE_QUERY, Body, page_params, read_body
from pipeline.marketing import campaigns as rules
from pipeline.marketing.campaigns import EMPTY_RECIPIENTS, MAX_LIST_RECIPIENTS, CampaignFields
from pipeline.submit import Queued
from storage import campaigns as campaign_store
from storage.models import Campaign, CampaignStatus, Project

CampaignId = Annotated[str, StringConstraints(min_length=1, max_length=64, pattern=NO_NUL)]
Recipient = Annotated[str, StringConstraints(min_length=1, max_length=320, pattern=NO_NUL)]
MAX_DELAY_MINUTES = 60 * 24 * 366
MAX_TEST_RECIPIENTS = 10
Style = Literal["PLUNK", "HTML"]
AudienceKind = Literal["ALL", "SEGMENT", "LIST"]
BodyText = Annotated[str, StringConstraints(max_length=5_000_000),
                     WithJsonSchema({"type": "string", "maxLength": 5_000_000})]


class SegmentSnapshot(Out):
    id: str
    name: str
    condition: dict[str, Any]


class CampaignOut(Out):
    id: str
    name: str
    subject: str
    body: str
    style: Style
    template: str | None
    from_: str | None = Field(alias="from")
    fromName: str | None
    reply: str | None
    audience: AudienceKind
    segment: str | None
    segmentSnapshot: SegmentSnapshot | None
    """The segment a finished campaign went to, kept when that segment was deleted (`segment` is then null)."""
    recipients: list[str]
    status: Literal["DRAFT", "SCHEDULED", "SENDING", "PAUSED", "SENT", "CANCELLED"]
    scheduledAt: datetime | None
    startedAt: datetime | None
    finishedAt: datetime | None
    delivered: datetime | None
    recipientCount: int = Field(ge=0)
    projectId: str
    createdAt: datetime
    updatedAt: datetime


class TestCopyContact(Out):
    id: None
    """A test copy goes to no contact of the project (none is created or changed)."""
    email: str


class TestCopy(Out):
    contact: TestCopyContact
    email: str


class TestCopies(Out):
    emails: list[TestCopy]
    timestamp: datetime


class CampaignPage(Out):
    items: list[CampaignOut]
    nextCursor: str | None
    hasMore: bool
    total: int = Field(ge=0)


class CampaignStats(Out):
    id: str
    status: str
    recipients: int = Field(ge=0)
    queued: int = Field(ge=0)
    sent: int = Field(ge=0)
    delivered: int = Field(ge=0)
    opened: int = Field(ge=0)
    clicked: int = Field(ge=0)
    bounced: int = Field(ge=0)
    complained: int = Field(ge=0)
    unsubscribed: int = Field(ge=0)
    failed: int = Field(ge=0)
    cancelled: int = Field(ge=0)


def campaign_json(campaign: Campaign) -> dict[str, Any]:
    return {"id": campaign.id, "name": campaign.name, "subject": campaign.subject, "body": campaign.body,
            "style": campaign.style, "template": campaign.template_id, "from": campaign.from_email,
            "fromName": campaign.from_name, "reply": campaign.reply_to, "audience": campaign.audience,
            "segment": campaign.segment_id, "segmentSnapshot": campaign.segment_snapshot,
            "recipients": list(campaign.recipients or []), "status": campaign.status,
            "scheduledAt": campaign.scheduled_at, "startedAt": campaign.started_at,
            "finishedAt": campaign.finished_at,
            "delivered": campaign.finished_at if campaign.status == CampaignStatus.SENT else None,
            "recipientCount": campaign.recipient_count, "projectId": campaign.project_id,
            "createdAt": campaign.created_at, "updatedAt": campaign.updated_at}


class CampaignBody(Body):
    name: Annotated[str, StringConstraints(max_length=200, pattern=NO_NUL)] | None = None
    subject: HeaderText | None = None
    body: BodyText | None = None
    style: Style | None = None
    template: CampaignId | None = None
    from_: HeaderEmail | None = Field(default=None, alias="from")
    fromName: HeaderText | None = None
    reply: HeaderEmail | None = None
    recipients: Annotated[list[Recipient], Field(min_length=1, max_length=MAX_LIST_RECIPIENTS)] | None = None
    """Contact ids or emails (seed 001/002); a LIST audience. An empty list is refused, never "everyone"."""
    segment: CampaignId | None = None
    audience: AudienceKind | None = None

    @field_validator("recipients", mode="before")
    @classmethod
    def not_empty(cls, value: Any) -> Any:
        if value == []:
            raise PydanticCustomError("too_small", EMPTY_RECIPIENTS)
        return value

    def fields(self) -> CampaignFields:
        return CampaignFields(self.name, self.subject, self.body, self.style, self.template, self.from_,
                              self.fromName, self.reply, self.recipients, self.segment, self.audience)


class CreateCampaignBody(CampaignBody):
    """A new campaign names its audience: recipients, a segment, or `audience` (ALL: every subscribed contact)."""

    model_config = ConfigDict(json_schema_extra={"anyOf": [
        {"required": ["recipients"], "properties": {"recipients": {"type": "array"}}},
        {"required": ["segment"], "properties": {"segment": {"type": "string"}}},
        {"required": ["audience"], "properties": {"audience": {"type": "string"}}}]})


class UpdateCampaignBody(CampaignBody):
    id: CampaignId


class CampaignRefBody(Body):
    id: CampaignId


Delay = Annotated[int, Field(ge=0, le=MAX_DELAY_MINUTES)]


class SendBody(Body):
    """POST /campaigns/:id/send: now, `delay` minutes from now, or at `scheduledAt`."""

    delay: Delay | None = None
    scheduledAt: Annotated[AwareDatetime, Field(strict=False)] | None = None


class LegacySendBody(Body):
    """Seed 002's POST /campaigns/send: `live` false (the default) sends one test copy to the project's
    sender address."""

    id: CampaignId
    live: bool = False
    delay: Delay | None = None


class TestSendBody(Body):
    emails: Annotated[list[HeaderEmail], Field(min_length=1, max_length=MAX_TEST_RECIPIENTS)] | None = None


def _project(session, project_id: str) -> Project:
    return session.get(Project, project_id)


async def list_campaigns(request: web.Request) -> web.Response:
    limit, cursor = page_params(request)
    page = await request.app[DB].read(campaign_store.list_campaigns, caller(request).project_id, limit, cursor)
    return success(page_json(page, campaign_json))


async def get_campaign(request: web.Request) -> web.Response:
    campaign = await request.app[DB].read(rules.require_campaign, caller(request).project_id,
                                          request.match_info["id"])
    return success(campaign_json(campaign))


async def create_campaign(request: web.Request) -> web.Response:
    body = await read_body(request, CreateCampaignBody)
    project_id = caller(request).project_id
    campaign = await request.app[DB].write(lambda s: campaign_json(
        rules.create_campaign(s, project_id, body.fields())))
    return success(campaign)


async def _update(request: web.Request, campaign_id: str, body: CampaignBody) -> web.Response:
    project_id = caller(request).project_id
    campaign = await request.app[DB].write(lambda s: campaign_json(
        rules.update_campaign(s, project_id, campaign_id, body.fields())))
    return success(campaign)


async def put_campaign(request: web.Request) -> web.Response:
    body = await read_body(request, UpdateCampaignBody)
    return await _update(request, body.id, body)


async def patch_campaign(request: web.Request) -> web.Response:
    return await _update(request, request.match_info["id"], await read_body(request, CampaignBody))


async def _delete(request: web.Request, campaign_id: str) -> web.Response:
    project_id = caller(request).project_id
    campaign = await request.app[DB].write(lambda s: campaign_json(rules.delete_campaign(s, project_id, campaign_id)))
    return success(campaign)


async def delete_campaign_by_body(request: web.Request) -> web.Response:
    return await _delete(request, (await read_body(request, CampaignRefBody)).id)


async def delete_campaign_by_path(request: web.Request) -> web.Response:
    return await _delete(request, request.match_info["id"])


async def _schedule(request: web.Request, campaign_id: str, at: datetime) -> web.Response:
    project_id, links = caller(request).project_id, request.app[LINKS]
    max_bytes = request.app[CONFIG].smtp.max_message_bytes
    campaign = await request.app[DB].write(lambda s: campaign_json(
        rules.schedule_campaign(s, _project(s, project_id), campaign_id, at, links, max_bytes)))
    _wake(request)
    return success(campaign)


def _when(delay: int | None, scheduled_at: datetime | None) -> datetime:
    now = datetime.now(UTC)
    if scheduled_at is not None:
        return max(scheduled_at.astimezone(UTC), now)
    return now + timedelta(minutes=delay or 0)


async def send_campaign(request: web.Request) -> web.Response:
    body = await read_body(request, SendBody)
    return await _schedule(request, request.match_info["id"], _when(body.delay, body.scheduledAt))


async def _test(request: web.Request, campaign_id: str, addresses: list[str]) -> list[Queued]:
    project_id, links = caller(request).project_id, request.app[LINKS]
    max_bytes = request.app[CONFIG].smtp.max_message_bytes
    queued = await request.app[DB].write(lambda s: rules.send_test(s, _project(s, project_id), campaign_id,
                                                                    addresses, links, max_bytes))
    _wake(request)
    return queued


def _sent_json(queued: list[Queued]) -> dict[str, Any]:
    return {"emails": [{"contact": {"id": q.contact_id, "email": q.email}, "email": q.email_id} for q in queued],
            "timestamp": datetime.now(UTC)}


async def test_campaign(request: web.Request) -> web.Response:
    body = await read_body(request, TestSendBody)
    return success(_sent_json(await _test(request, request.match_info["id"], body.emails or [])))


async def legacy_send(request: web.Request) -> web.Response:
    body = await read_body(request, LegacySendBody)
    if body.live:
        return await _schedule(request, body.id, _when(body.delay, None))
    await _test(request, body.id, [])
    campaign = await request.app[DB].read(rules.require_campaign, caller(request).project_id, body.id)
    return success(campaign_json(campaign))


async def cancel_campaign(request: web.Request) -> web.Response:
    project_id, campaign_id = caller(request).project_id, request.match_info["id"]
    return success(await rules.cancel(request.app[DB], project_id, campaign_id, campaign_json))


async def resume_campaign(request: web.Request) -> web.Response:
    project_id, campaign_id = caller(request).project_id, request.match_info["id"]
    campaign = await rules.resume(request.app[DB], project_id, campaign_id, campaign_json)
    _wake(request)
    return success(campaign)


async def campaign_stats(request: web.Request) -> web.Response:
    project_id = caller(request).project_id

    def read(session) -> dict[str, Any]:
        campaign = rules.require_campaign(session, project_id, request.match_info["id"])
        stats = campaign_store.campaign_stats(session, campaign.id)
        return {"id": campaign.id, "status": campaign.status, "recipients": campaign.recipient_count,
                **{name: stats.get(name, 0) for name in CampaignStats.model_fields if name not in
                   ("id", "status", "recipients")}}

    return success(await request.app[DB].read(read))


def _wake(request: web.Request) -> None:
    for wake in request.app[ON_QUEUED]:
        wake()


TAG = "Campaigns"
ROUTES = [
    Route("GET", "/campaigns", list_campaigns, "List campaigns, newest first", query=PAGE_QUERY, tag=TAG,
          response=CampaignPage, legacy="items"),
    Route("POST", "/campaigns", create_campaign, "Create a campaign (a draft)", body=CreateCampaignBody, tag=TAG,
          status=201, seed_status=200, response=CampaignOut),
    Route("PUT", "/campaigns", put_campaign, "Update a draft or scheduled campaign (id in the body)",
          body=UpdateCampaignBody, tag=TAG, response=CampaignOut, errors=frozenset({404, 409})),
    Route("DELETE", "/campaigns", delete_campaign_by_body, "Delete a campaign (id in the body)",
          body=CampaignRefBody, tag=TAG, response=CampaignOut, errors=frozenset({404, 409})),
    Route("POST", "/campaigns/send", legacy_send, "Send a campaign: live, after `delay` minutes, or a test copy "
          "to the project's sender", body=LegacySendBody, tag=TAG, response=CampaignOut,
          errors=frozenset({404, 409})),
    Route("GET", "/campaigns/{id}", get_campaign, "Get a campaign", tag=TAG, response=CampaignOut),
    Route("PATCH", "/campaigns/{id}", patch_campaign, "Update a draft or scheduled campaign", body=CampaignBody,
          tag=TAG, response=CampaignOut, errors=frozenset({409})),
    Route("DELETE", "/campaigns/{id}", delete_campaign_by_path, "Delete a campaign that is not sending", tag=TAG,
          response=CampaignOut, errors=frozenset({409})),
    Route("POST", "/campaigns/{id}/send", send_campaign, "Send a campaign to its audience now or later",
          body=SendBody, tag=TAG, response=CampaignOut, errors=frozenset({409})),
    Route("POST", "/campaigns/{id}/test", test_campaign, "Send test copies now (to no contact: the audience is "
          "left as it was)", body=TestSendBody, tag=TAG, response=TestCopies),
    Route("POST", "/campaigns/{id}/cancel", cancel_campaign, "Cancel a scheduled or sending campaign", tag=TAG,
          response=CampaignOut, errors=frozenset({409})),
    Route("POST", "/campaigns/{id}/resume", resume_campaign, "Resume a campaign the reputation guard paused",
          tag=TAG, response=CampaignOut, errors=frozenset({409})),
    Route("GET", "/campaigns/{id}/stats", campaign_stats, "A campaign's delivery and engagement counts", tag=TAG,
          response=CampaignStats),
]
