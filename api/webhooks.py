"""Outbound webhooks: endpoints (a URL and the event names it receives), their secret (shown when made or
rotated, never again), their deliveries with each one's attempts, and a test delivery.

Rules are `pipeline.webhooks` (the URL, the event names, the cap per project); the sender is
`webhooks.sender`. No route here starts with /webhooks/incoming (the SNS intake's).
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from aiohttp import web
from pydantic import Field, StringConstraints, WithJsonSchema

from api.context import CONFIG, DB, ON_QUEUED
from api.envelope import success
from api.routing import Route, caller
from api.schemas import Out
from api.serialize import page_json
from api.validation import NO_NUL, PAGE_QUERY, Body, page_params, read_body
from pipeline import webhooks as rules
from pipeline.errors import FieldError, ValidationFailed
from pipeline.events import WILDCARDS
from pipeline.webhook_targets import MAX_URL, URL_PATTERN, check_target
from storage import webhooks as store
from storage.models import WebhookDelivery, WebhookEndpoint, utcnow

WebhookUrl = Annotated[str, StringConstraints(max_length=MAX_URL), WithJsonSchema({
    "type": "string", "maxLength": MAX_URL, "pattern": URL_PATTERN,
    "description": "http:// or https://, with no user or password; unless webhooks.allow_private_targets "
                   "is on, its host may resolve only to public addresses"})]
EventName = Annotated[str, StringConstraints(min_length=1, max_length=rules.MAX_EVENT_NAME), WithJsonSchema({
    "type": "string", "minLength": 1, "maxLength": rules.MAX_EVENT_NAME, "pattern": NO_NUL,
    "anyOf": [{"enum": [*rules.SYSTEM_EVENTS, *WILDCARDS]},
              {"pattern": "^segment\\.[^.]+\\.(entry|exit)$"},
              {"not": {"pattern": "^\\s*(email|contact|segment)\\."}}],
    "description": "An event name you track, a system event, or a pattern: * (all), email.*, contact.*, "
                   "segment.*"})]
EventNames = Annotated[list[EventName], Field(min_length=1, max_length=rules.MAX_EVENTS)]
DeliveryStatus = Literal["PENDING", "DELIVERED", "FAILED"]


class CreateWebhookBody(Body):
    url: WebhookUrl
    events: EventNames
    enabled: bool = True


class UpdateWebhookBody(Body):
    """The fields to change (omitted or null: unchanged). `enabled: true` on a disabled endpoint also
    forgets its failure streak; `enabled: false` fails its pending deliveries."""

    url: WebhookUrl | None = None
    events: EventNames | None = None
    enabled: bool | None = None


class WebhookOut(Out):
    id: str
    url: str
    events: list[str]
    enabled: bool
    consecutiveFailures: int = Field(ge=0, description="Failed attempts since the last delivered one")
    failingSince: datetime | None
    disabledReason: str | None
    disabledAt: datetime | None
    createdAt: datetime
    updatedAt: datetime


class WebhookWithSecret(WebhookOut):
    secret: str = Field(description="whsec_ + base64: shown only now. Verify each request's webhook-signature "
                                    "with it (Standard Webhooks)")


class WebhookPage(Out):
    items: list[WebhookOut]
    nextCursor: str | None
    hasMore: bool
    total: int = Field(ge=0)


class AttemptOut(Out):
    at: datetime
    status: int | None = Field(description="The HTTP status; null when no reply came")
    durationMs: int = Field(ge=0)
    error: str | None


class DeliveryOut(Out):
    id: str = Field(description="The webhook-id header of every attempt")
    webhookId: str
    eventId: str | None
    type: str
    status: DeliveryStatus
    attempts: int = Field(ge=0)
    nextAttemptAt: datetime | None
    lastStatus: int | None
    lastError: str | None
    payload: dict[str, Any]
    attemptLog: list[AttemptOut] = Field(description=f"The latest {store.ATTEMPT_LOG_CAP} attempts, oldest first")
    createdAt: datetime
    updatedAt: datetime


class DeliveryPage(Out):
    items: list[DeliveryOut]
    nextCursor: str | None
    hasMore: bool
    total: int = Field(ge=0)


def webhook_json(endpoint: WebhookEndpoint) -> dict[str, Any]:
    return {"id": endpoint.id, "url": endpoint.url, "events": list(endpoint.events or []),
            "enabled": endpoint.enabled, "consecutiveFailures": endpoint.consecutive_failures,
            "failingSince": endpoint.failing_since, "disabledReason": endpoint.disabled_reason,
            "disabledAt": endpoint.disabled_at, "createdAt": endpoint.created_at, "updatedAt": endpoint.updated_at}


def with_secret(endpoint: WebhookEndpoint) -> dict[str, Any]:
    return {**webhook_json(endpoint), "secret": endpoint.secret}


def delivery_json(delivery: WebhookDelivery) -> dict[str, Any]:
    return {"id": delivery.id, "webhookId": delivery.endpoint_id, "eventId": delivery.event_id,
            "type": delivery.event_name, "status": delivery.status, "attempts": delivery.attempts,
            "nextAttemptAt": delivery.due_at if delivery.status == store.PENDING else None,
            "lastStatus": delivery.last_status, "lastError": delivery.last_error, "payload": delivery.payload,
            "attemptLog": list(delivery.attempt_log or []), "createdAt": delivery.created_at,
            "updatedAt": delivery.updated_at}


async def list_webhooks(request: web.Request) -> web.Response:
    limit, cursor = page_params(request)
    page = await request.app[DB].read(store.list_endpoints, caller(request).project_id, limit, cursor)
    return success(page_json(page, webhook_json))


async def create_webhook(request: web.Request) -> web.Response:
    body = await read_body(request, CreateWebhookBody)
    settings = request.app[CONFIG].webhooks
    await check_target(body.url, settings.allow_private_targets)
    rules.check_events(body.events)
    project_id = caller(request).project_id
    endpoint = await request.app[DB].write(lambda s: rules.create_endpoint(
        s, project_id, body.url, body.events, body.enabled, settings.allow_private_targets,
        settings.max_endpoints_per_project))
    return success(with_secret(endpoint))


async def get_webhook(request: web.Request) -> web.Response:
    endpoint = await request.app[DB].read(rules.require_endpoint, caller(request).project_id,
                                          request.match_info["id"])
    return success(webhook_json(endpoint))


async def update_webhook(request: web.Request) -> web.Response:
    body = await read_body(request, UpdateWebhookBody)
    allow_private = request.app[CONFIG].webhooks.allow_private_targets
    if body.url is not None:
        await check_target(body.url, allow_private)
    project_id, endpoint_id = caller(request).project_id, request.match_info["id"]
    endpoint = await request.app[DB].write(lambda s: rules.update_endpoint(
        s, project_id, endpoint_id, allow_private, body.url, body.events, body.enabled))
    return success(webhook_json(endpoint))


async def delete_webhook(request: web.Request) -> web.Response:
    project_id, endpoint_id = caller(request).project_id, request.match_info["id"]
    endpoint = await rules.delete(request.app[DB], project_id, endpoint_id)
    return success(webhook_json(endpoint))


async def rotate_secret(request: web.Request) -> web.Response:
    project_id, endpoint_id = caller(request).project_id, request.match_info["id"]
    endpoint = await request.app[DB].write(lambda s: rules.rotate_secret(s, project_id, endpoint_id, utcnow()))
    return success(with_secret(endpoint))


def _delivery_query(request: web.Request) -> tuple[int, str | None, str | None]:
    """?limit, ?cursor and ?status, every bad one named in one 422."""
    errors: list[FieldError] = []
    try:
        limit, cursor = page_params(request)
    except ValidationFailed as exc:
        errors, limit, cursor = list(exc.errors), 0, None
    status = request.query.get("status")
    if status is not None and status not in store.STATUSES:
        errors.append(FieldError("status", "status must be PENDING, DELIVERED or FAILED", "invalid_enum_value"))
    if errors:
        raise ValidationFailed(errors)
    return limit, cursor, status


async def list_deliveries(request: web.Request) -> web.Response:
    limit, cursor, status = _delivery_query(request)
    project_id, endpoint_id = caller(request).project_id, request.match_info["id"]

    def query(session):
        rules.require_endpoint(session, project_id, endpoint_id)
        return store.list_deliveries(session, endpoint_id, limit, cursor, status)

    return success(page_json(await request.app[DB].read(query), delivery_json))


async def send_test(request: web.Request) -> web.Response:
    project_id, endpoint_id = caller(request).project_id, request.match_info["id"]
    delivery = await request.app[DB].write(lambda s: rules.send_test(s, project_id, endpoint_id, utcnow()))
    for wake in request.app[ON_QUEUED]:
        wake()
    return success(delivery_json(delivery))


TAG = "Webhooks"
ROUTES = [
    Route("GET", "/webhooks", list_webhooks, "List webhook endpoints, newest first", query=PAGE_QUERY, tag=TAG,
          response=WebhookPage, legacy="items"),
    Route("POST", "/webhooks", create_webhook, "Create a webhook endpoint (the reply holds its secret, shown only "
          "now)", body=CreateWebhookBody, tag=TAG, status=201, response=WebhookWithSecret),
    Route("GET", "/webhooks/{id}", get_webhook, "Get a webhook endpoint", tag=TAG, response=WebhookOut),
    Route("PATCH", "/webhooks/{id}", update_webhook, "Change a webhook endpoint's URL, events or enabled state",
          body=UpdateWebhookBody, tag=TAG, response=WebhookOut),
    Route("DELETE", "/webhooks/{id}", delete_webhook, "Delete a webhook endpoint and its deliveries", tag=TAG,
          response=WebhookOut),
    Route("POST", "/webhooks/{id}/rotate-secret", rotate_secret, "A new secret (shown only now); the old one "
          "signs too, as a second signature, for 24 hours", tag=TAG, response=WebhookWithSecret),
    Route("GET", "/webhooks/{id}/deliveries", list_deliveries, "An endpoint's deliveries with their attempts, "
          "newest first", query={**PAGE_QUERY, "status": {"type": "string", "enum": list(store.STATUSES)}},
          tag=TAG, response=DeliveryPage, legacy="items"),
    Route("POST", "/webhooks/{id}/test", send_test, "Queue a webhook.test delivery to the endpoint", tag=TAG,
          status=202, response=DeliveryOut, errors=frozenset({409})),
]
