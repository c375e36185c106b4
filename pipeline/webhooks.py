"""Outbound webhook rules: which URLs and event names an endpoint may have, its secret, the cap per
project, and which addresses a delivery may connect to (`public_address`, also used by the sender after
every DNS lookup, so a name that resolves to a private address is refused at connection time too)."""

from __future__ import annotations

import base64
import ipaddress
import secrets
from datetime import datetime, timedelta
from urllib.parse import urlsplit

from sqlalchemy.orm import Session

from pipeline.contacts import is_system_event
from pipeline.errors import Conflict, FieldError, NotFound, ValidationFailed
from pipeline.workflow_definitions import MAX_URL, URL
from storage import webhooks as store
from storage.models import WebhookDelivery, WebhookEndpoint, utcnow

SECRET_PREFIX = "whsec_"
SECRET_BYTES = 32
"""The Standard Webhooks spec asks for 24 to 64 random bytes."""
MAX_EVENTS = 50
MAX_EVENT_NAME = 200
SYSTEM_EVENTS = ("email.sent", "email.delivery", "email.open", "email.click", "email.bounce", "email.complaint",
                 "contact.subscribed", "contact.unsubscribed")
"""The system events plunkd records, besides `segment.<slug>.entry|exit` (seed 004)."""
SEGMENT_EVENT = "segment.<slug>.entry|exit"
ROTATION_OVERLAP = timedelta(hours=24)
"""How long the secret before a rotation keeps signing (as a second signature)."""
_LOCAL_NAMES = ("localhost", "localhost.", "localhost.localdomain")


def new_secret() -> str:
    return SECRET_PREFIX + base64.b64encode(secrets.token_bytes(SECRET_BYTES)).decode()


def public_address(address: str) -> bool:
    """Whether `address` (an IP literal) is on the public internet: not loopback, private, link-local,
    shared (CGNAT), multicast, reserved or unspecified, also when an IPv6 address embeds an IPv4 one."""
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address):
        embedded = ip.ipv4_mapped or ip.sixtofour or (ip.teredo[1] if ip.teredo else None)
        if embedded is not None:
            ip = embedded
    return ip.is_global and not ip.is_multicast


def private_host(host: str) -> bool:
    """A host that names this machine or a non-public address literally (names are checked after DNS)."""
    host = host.lower().strip("[]")
    if host in _LOCAL_NAMES or host.endswith((".localhost", ".localhost.")):
        return True
    try:
        ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return False
    return not public_address(host)


def url_problem(url: str, allow_private: bool) -> FieldError | None:
    """Why `url` cannot be an endpoint, or None: http(s) with a host, a valid port, no user or password
    (they would show in logs and the API), at most MAX_URL characters, and (unless `allow_private`) no
    loopback or private address."""
    if len(url) > MAX_URL:
        return FieldError("url", f"At most {MAX_URL} characters", "too_big")
    if not URL.fullmatch(url) or any(ord(c) < 0x20 or ord(c) == 0x7F for c in url):
        return FieldError("url", "Expected an http:// or https:// URL with a host", "invalid_url")
    try:
        parts = urlsplit(url)
        host, _ = parts.hostname, parts.port
    except ValueError:
        return FieldError("url", "Expected an http:// or https:// URL with a host and a valid port", "invalid_url")
    if not host:
        return FieldError("url", "Expected an http:// or https:// URL with a host", "invalid_url")
    if parts.username is not None or parts.password is not None:
        return FieldError("url", "The URL may not carry a user name or password; authenticate the request by its "
                                 "signature", "invalid_url")
    if not allow_private and private_host(host):
        return FieldError("url", f"{host} is a loopback or private address (webhooks.allow_private_targets is "
                                 "off)", "private_target")
    return None


def event_problem(name: str) -> str | None:
    """Why an endpoint cannot listen for `name`, or None. Any name `/v1/track` accepts is fine, so are the
    system events plunkd records and the patterns `*`, `email.*`, `contact.*`, `segment.*`. A name in a
    system namespace that plunkd never records (`email.delivered`) is refused: it would never fire."""
    if not name or len(name) > MAX_EVENT_NAME or "\x00" in name:
        return f"Event names are 1 to {MAX_EVENT_NAME} characters"
    if name in store.WILDCARDS or name in SYSTEM_EVENTS or (name.startswith("segment.") and is_system_event(name)):
        return None
    if name.startswith(("email.", "contact.", "segment.")):
        known = ", ".join([*SYSTEM_EVENTS, SEGMENT_EVENT, *store.WILDCARDS])
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


def send_test(session: Session, project_id: str, endpoint_id: str, now: datetime) -> WebhookDelivery:
    """Queue a `webhook.test` delivery; 409 when the endpoint is disabled (it would never be sent)."""
    endpoint = require_endpoint(session, project_id, endpoint_id)
    if not endpoint.enabled:
        raise Conflict(f"Webhook {endpoint_id} is disabled", "Enable it first (PATCH with {\"enabled\": true}).")
    return store.queue_test(session, endpoint, now)
