"""A project's webhook endpoints: the list, a new one (its secret shown once), enable and disable, delete,
a new secret (shown once), a test delivery, and an endpoint's page with its delivery log and a resend.

The rules are `pipeline.webhooks` and `pipeline.webhook_targets` (the API's too: the same validation and
the same SSRF check). A resend queues a new delivery of the same event and payload (a new `webhook-id`),
which the sender posts as any other; the earlier delivery keeps its own attempts.
"""

from __future__ import annotations

import re
from typing import Any

from dashboard.context import CONFIG, DB, ON_QUEUED
from dashboard.routing import Answer, Ctx, Page, form_of
from pipeline import webhooks as rules
from pipeline.errors import FieldError, ValidationFailed
from pipeline.webhook_targets import MAX_URL, check_target
from storage import webhooks as store
from storage.models import Role, WebhookDelivery, WebhookEndpoint, utcnow
from storage.pagination import is_valid_cursor

PAGE_SIZE = 50
EXCERPT = 300
"""Characters of a delivery's last error (which holds the start of a failed reply's body) shown."""
MAX_EVENTS_FIELD = rules.MAX_EVENTS * (rules.MAX_EVENT_NAME + 2)
EVENT_SEPARATORS = re.compile(r"[,\s]+")


def endpoint_json(endpoint: WebhookEndpoint) -> dict[str, Any]:
    return {"id": endpoint.id, "url": endpoint.url, "events": list(endpoint.events or []),
            "enabled": endpoint.enabled, "consecutiveFailures": endpoint.consecutive_failures,
            "failingSince": endpoint.failing_since, "disabledReason": endpoint.disabled_reason,
            "disabledAt": endpoint.disabled_at, "createdAt": endpoint.created_at}


def delivery_json(delivery: WebhookDelivery) -> dict[str, Any]:
    return {"id": delivery.id, "type": delivery.event_name, "eventId": delivery.event_id,
            "status": delivery.status, "attempts": delivery.attempts, "lastStatus": delivery.last_status,
            "reply": (delivery.last_error or "")[:EXCERPT] or None,
            "nextAttemptAt": delivery.due_at if delivery.status == store.PENDING else None,
            "createdAt": delivery.created_at, "updatedAt": delivery.updated_at}


def cursor_of(ctx: Ctx) -> str | None:
    cursor = ctx.request.query.get("cursor")
    if cursor is not None and not is_valid_cursor(cursor):
        raise ValidationFailed([FieldError("cursor", "Not a cursor of this list: follow the Next link",
                                           "invalid_string")])
    return cursor


def webhook_id(ctx: Ctx) -> str:
    return ctx.request.match_info["webhook"][:64]


def woken(ctx: Ctx) -> None:
    for wake in ctx.request.app[ON_QUEUED]:
        wake()


async def webhook_list(ctx: Ctx, errors: list[dict[str, str]] | None = None,
                       entered: dict[str, str] | None = None, status: int = 200) -> Answer:
    cursor = cursor_of(ctx)
    page = await ctx.request.app[DB].read(store.list_endpoints, ctx.project_id, PAGE_SIZE, cursor)
    return Answer("webhooks.html", {
        "webhooks": [endpoint_json(endpoint) for endpoint in page.items], "nextCursor": page.next_cursor,
        "total": page.total, "events": [*rules.SYSTEM_EVENTS, "*", "email.*", "contact.*", "segment.*"],
        "errors": errors or [], "entered": entered or {"url": "", "events": "", "enabled": "on"},
        "maxEventsField": MAX_EVENTS_FIELD}, status=status)


def event_names(text: str) -> list[str]:
    if len(text) > MAX_EVENTS_FIELD:
        raise ValidationFailed([FieldError("events", f"At most {rules.MAX_EVENTS} event names", "too_big")])
    return [name for name in EVENT_SEPARATORS.split(text) if name]


async def create(ctx: Ctx) -> Answer:
    """A new endpoint through the API's rules (URL, SSRF check, event names, the cap per project); its
    secret is shown on the next page only."""
    fields = await form_of(ctx.request)
    url, events_text = fields.get("url", "").strip(), fields.get("events", "")
    enabled = fields.get("enabled", "") in ("on", "true", "1")
    settings = ctx.request.app[CONFIG].webhooks
    try:
        events = event_names(events_text)
        if len(url) > MAX_URL:
            raise ValidationFailed([FieldError("url", f"At most {MAX_URL} characters", "too_big")])
        await check_target(url, settings.allow_private_targets)
        rules.check_events(events)
        endpoint = await ctx.request.app[DB].write(lambda s: rules.create_endpoint(
            s, ctx.project_id, url, events, enabled, settings.allow_private_targets,
            settings.max_endpoints_per_project))
    except ValidationFailed as exc:
        return await webhook_list(ctx, [e.as_dict() for e in exc.errors],
                                  {"url": url[:MAX_URL], "events": events_text[:MAX_EVENTS_FIELD],
                                   "enabled": "on" if enabled else ""}, 422)
    return Answer("webhook_secret.html", {**endpoint_json(endpoint), "secret": endpoint.secret, "created": True},
                  status=201)


async def detail(ctx: Ctx) -> Answer:
    cursor = cursor_of(ctx)
    status = ctx.request.query.get("status") or None
    if status is not None and status not in store.STATUSES:
        raise ValidationFailed([FieldError("status", "status must be PENDING, DELIVERED or FAILED",
                                           "invalid_enum_value")])
    project_id, endpoint_id = ctx.project_id, webhook_id(ctx)

    def query(session):
        endpoint = rules.require_endpoint(session, project_id, endpoint_id)
        return endpoint, store.list_deliveries(session, endpoint_id, PAGE_SIZE, cursor, status, count=False)

    endpoint, page = await ctx.request.app[DB].read(query)
    return Answer("webhook.html", {**endpoint_json(endpoint),
                                   "deliveries": [delivery_json(d) for d in page.items],
                                   "nextCursor": page.next_cursor, "status": status,
                                   "statuses": [s.value for s in store.STATUSES]})


async def set_enabled(ctx: Ctx, enabled: bool) -> Answer:
    allow_private = ctx.request.app[CONFIG].webhooks.allow_private_targets
    project_id, endpoint_id = ctx.project_id, webhook_id(ctx)
    endpoint = await ctx.request.app[DB].write(lambda s: rules.update_endpoint(
        s, project_id, endpoint_id, allow_private, enabled=enabled))
    return Answer(redirect=f"/projects/{project_id}/webhooks/{endpoint_id}",
                  flash="Webhook enabled" if enabled else "Webhook disabled", data=endpoint_json(endpoint))


async def enable(ctx: Ctx) -> Answer:
    return await set_enabled(ctx, True)


async def disable(ctx: Ctx) -> Answer:
    return await set_enabled(ctx, False)


async def delete(ctx: Ctx) -> Answer:
    project_id, endpoint_id = ctx.project_id, webhook_id(ctx)
    endpoint = await rules.delete(ctx.request.app[DB], project_id, endpoint_id)
    return Answer(redirect=f"/projects/{project_id}/webhooks", flash="Webhook deleted", data=endpoint_json(endpoint))


async def rotate(ctx: Ctx) -> Answer:
    project_id, endpoint_id = ctx.project_id, webhook_id(ctx)
    endpoint = await ctx.request.app[DB].write(lambda s: rules.rotate_secret(s, project_id, endpoint_id, utcnow()))
    return Answer("webhook_secret.html", {**endpoint_json(endpoint), "secret": endpoint.secret, "created": False})


async def send_test(ctx: Ctx) -> Answer:
    project_id, endpoint_id = ctx.project_id, webhook_id(ctx)
    delivery = await ctx.request.app[DB].write(lambda s: rules.send_test(s, project_id, endpoint_id, utcnow()))
    woken(ctx)
    return Answer(redirect=f"/projects/{project_id}/webhooks/{endpoint_id}", flash="Test delivery queued",
                  data=delivery_json(delivery), status=202)


async def resend(ctx: Ctx) -> Answer:
    project_id, endpoint_id = ctx.project_id, webhook_id(ctx)
    delivery_id = ctx.request.match_info["delivery"][:64]
    delivery = await ctx.request.app[DB].write(lambda s: rules.resend_delivery(
        s, project_id, endpoint_id, delivery_id, utcnow()))
    woken(ctx)
    return Answer(redirect=f"/projects/{project_id}/webhooks/{endpoint_id}", flash="Delivery queued again",
                  data=delivery_json(delivery), status=202)


ONE = "/projects/{project}/webhooks/{webhook}"
ROUTES = [
    Page("GET", "/projects/{project}/webhooks", webhook_list),
    Page("POST", "/projects/{project}/webhooks", create, role=Role.ADMIN),
    Page("GET", ONE, detail),
    Page("POST", f"{ONE}/enable", enable, role=Role.ADMIN),
    Page("POST", f"{ONE}/disable", disable, role=Role.ADMIN),
    Page("POST", f"{ONE}/delete", delete, role=Role.ADMIN),
    Page("POST", f"{ONE}/rotate-secret", rotate, role=Role.ADMIN),
    Page("POST", f"{ONE}/test", send_test, role=Role.EDITOR),
    Page("POST", f"{ONE}/deliveries/{{delivery}}/resend", resend, role=Role.EDITOR),
]
