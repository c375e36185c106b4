"""Outbound webhook rules: which URLs (`pipeline.webhook_targets`, shared with workflow webhook steps) and
event names an endpoint may have, its secret, and the cap per project."""

from __future__ import annotations

import base64
import secrets
from datetime import datetime, timedelta

from sqlalchemy.orm import Session

from pipeline.contacts import is_system_event
from pipeline.errors import Conflict, FieldError, NotFound, ValidationFailed
from pipeline.events import WILDCARDS, event_payload
from pipeline.webhook_targets import url_problem
from storage import webhooks as store
from storage.db import Database
from storage.models import WebhookDelivery, WebhookEndpoint, utcnow

SECRET_PREFIX = "whsec_"
SECRET_BYTES = 32
"""The Standard Webhooks spec asks for 24 to 64 random bytes."""
MAX_EVENTS = 50
MAX_EVENT_NAME = 200
SYSTEM_EVENTS = ("email.sent", "email.delivery", "email.open", "email.click", "email.bounce", "email.complaint",
                 "email.received", "contact.subscribed", "contact.unsubscribed", "domain.verified",
                 "domain.unverified", "campaign.paused", "reputation.warning", "reputation.paused")
"""The system events plunkd records, besides `segment.<slug>.entry|exit` (seed 004)."""
SEGMENT_EVENT = "segment.<slug>.entry|exit"
TEST_EVENT = "webhook.test"
"""The type of the delivery `POST /webhooks/:id/test` sends (never an event of its own)."""
ROTATION_OVERLAP = timedelta(hours=24)
"""How long the secret before a rotation keeps signing (as a second signature)."""


def new_secret() -> str:
    return SECRET_PREFIX + base64.b64encode(secrets.token_bytes(SECRET_BYTES)).decode()


def event_problem(name: str) -> str | None:
    """Why an endpoint cannot listen for `name`, or None. Any name `/v1/track` accepts is fine, so are the
    system events plunkd records and the patterns `*`, `email.*`, `contact.*`, `segment.*`. A name in a
    system namespace that plunkd never records (`email.delivered`) is refused: it would never fire."""
    if not name or len(name) > MAX_EVENT_NAME or "\x00" in name:
        return f"Event names are 1 to {MAX_EVENT_NAME} characters"
    if name in WILDCARDS or name in SYSTEM_EVENTS or (name.startswith("segment.") and is_system_event(name)):
        return None
    if name.startswith(("email.", "contact.", "segment.")):
        known = ", ".join([*SYSTEM_EVENTS, SEGMENT_EVENT, *WILDCARDS])
        return f"'{name}' is not an event plunkd records; system events are {known}"
    return None


def check_events(events: list[str]) -> list[str]:
    """The names (stripped of surrounding white space, as `/v1/track` stores them), each once, in the order
    given; 422 naming each bad one."""
    if not events:
        raise ValidationFailed([FieldError("events", "List at least one event name (or \"*\" for all)",
                                           "too_small")])
    if len(events) > MAX_EVENTS:
        raise ValidationFailed([FieldError("events", f"At most {MAX_EVENTS} event names", "too_big")])
    names = [name.strip() for name in events]
    errors = [FieldError(f"events.{index}", problem, "unknown_event")
              for index, name in enumerate(names) if (problem := event_problem(name)) is not None]
    if errors:
        raise ValidationFailed(errors)
    return list(dict.fromkeys(names))


def check_url(url: str, allow_private: bool) -> str:
    problem = url_problem(url, allow_private)
    if problem is not None:
        raise ValidationFailed([problem])
    return url


class TooManyWebhooks(ValidationFailed):
    def __init__(self, limit: int) -> None:
        super().__init__([FieldError("url", f"A project can have at most {limit} webhook endpoints "
                                            "(webhooks.max_endpoints_per_project)", "too_many_webhooks")],
                         message=f"This project has reached its limit of {limit} webhook endpoints",
                         suggestion="Delete an endpoint the project no longer uses (DELETE /webhooks/:id), or "
                                    "raise webhooks.max_endpoints_per_project.")


def require_endpoint(session: Session, project_id: str, endpoint_id: str, for_update: bool = False) -> WebhookEndpoint:
    endpoint = store.get_endpoint(session, project_id, endpoint_id, for_update)
    if endpoint is None:
        raise NotFound(f"Webhook {endpoint_id} not found", "Check the webhook id; it must belong to this project.")
    return endpoint


def create_endpoint(session: Session, project_id: str, url: str, events: list[str], enabled: bool,
                    allow_private: bool, max_endpoints: int) -> WebhookEndpoint:
    """A new endpoint with a new secret (the reply shows it; nothing else ever does)."""
    url, events = check_url(url, allow_private), check_events(events)
    store.lock_project_webhooks(session, project_id)
    if store.count_endpoints(session, project_id) >= max_endpoints:
        raise TooManyWebhooks(max_endpoints)
    return store.insert_endpoint(session, project_id, url, events, new_secret(), enabled)


def update_endpoint(session: Session, project_id: str, endpoint_id: str, allow_private: bool,
                    url: str | None = None, events: list[str] | None = None,
                    enabled: bool | None = None) -> WebhookEndpoint:
    """Change what is given. Disabling fails the endpoint's pending deliveries; enabling it again forgets its
    failure streak (and its disabled reason)."""
    if url is not None:
        check_url(url, allow_private)
    if events is not None:
        events = check_events(events)
    endpoint = require_endpoint(session, project_id, endpoint_id, for_update=True)
    if url is not None or events is not None:
        store.update_endpoint(session, endpoint, url, events)
    if enabled is True and not endpoint.enabled:
        store.enable_endpoint(session, endpoint)
    elif enabled is False and endpoint.enabled:
        store.disable_endpoint(session, endpoint.id, project_id, "disabled through the API", utcnow())
        session.refresh(endpoint)
    return endpoint


def rotate_secret(session: Session, project_id: str, endpoint_id: str, now: datetime) -> WebhookEndpoint:
    endpoint = require_endpoint(session, project_id, endpoint_id, for_update=True)
    store.rotate_secret(session, endpoint, new_secret(), now + ROTATION_OVERLAP)
    return endpoint


def delete_endpoint(session: Session, project_id: str, endpoint_id: str) -> WebhookEndpoint:
    endpoint = require_endpoint(session, project_id, endpoint_id, for_update=True)
    store.delete_endpoint(session, endpoint)
    return endpoint


async def delete(db: Database, project_id: str, endpoint_id: str) -> WebhookEndpoint:
    """`delete_endpoint`, its deliveries first, a thousand per transaction (the endpoint looked up again in each:
    404 for another project's): in the one transaction, a busy endpoint's deliveries held every other write on
    SQLite's one writer until it committed. Deliveries queued meanwhile go with the endpoint."""
    def part(session: Session, limit: int) -> int:
        require_endpoint(session, project_id, endpoint_id)
        return store.delete_deliveries(session, endpoint_id, limit)

    await db.write_in_chunks(part)
    return await db.write(lambda s: delete_endpoint(s, project_id, endpoint_id))


def require_enabled(session: Session, project_id: str, endpoint_id: str) -> WebhookEndpoint:
    """The endpoint; 409 when it is disabled (a delivery queued to it would never be sent)."""
    endpoint = require_endpoint(session, project_id, endpoint_id)
    if not endpoint.enabled:
        raise Conflict(f"Webhook {endpoint_id} is disabled", "Enable it first (PATCH with {\"enabled\": true}).")
    return endpoint


def send_test(session: Session, project_id: str, endpoint_id: str, now: datetime) -> WebhookDelivery:
    """Queue a `webhook.test` delivery; 409 when the endpoint is disabled (it would never be sent)."""
    endpoint = require_enabled(session, project_id, endpoint_id)
    payload = event_payload(None, TEST_EVENT, None, None, {"message": "A test delivery from plunkd"}, now)
    return store.queue_test(session, endpoint, TEST_EVENT, payload, now)


def resend_delivery(session: Session, project_id: str, endpoint_id: str, delivery_id: str,
                    now: datetime) -> WebhookDelivery:
    """A new delivery of an earlier one's event and payload to the same endpoint, due now: a new
    `webhook-id` (a receiver that deduplicates takes it as a new message) and a fresh attempt log, while the
    earlier delivery keeps its own history. 404 for a delivery not of this endpoint, 409 when disabled."""
    endpoint = require_enabled(session, project_id, endpoint_id)
    original = store.get_delivery(session, endpoint_id, delivery_id)
    if original is None:
        raise NotFound(f"Delivery {delivery_id} not found", "Check the delivery id; it must belong to this webhook.")
    return store.queue_test(session, endpoint, original.event_name, original.payload, now, original.event_id)
