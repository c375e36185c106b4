"""Inbound routes and the mail they receive: the rules of `/inbound/routes` and `RouteBook`, which the
inbound SMTP server calls at RCPT (`match`) and after DATA (`receive`).

A routed message becomes the project's `email.received` event. Its contact is the From header's address
(the envelope sender's when the From header has none that is valid; none for a null sender without one):
found, or created NOT subscribed (writing to a support address is no consent to marketing mail); so
workflows triggered by `email.received` start for it and webhooks carry it. The message row, its
attachments, the contact and the event with its webhook deliveries and workflow runs are written in one
transaction, committed before `receive` returns (before the server's 250).
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from pydantic_core import PydanticCustomError
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from core.config import Config
from pipeline import domains as domain_rules
from pipeline.contacts import upsert_contact
from pipeline.errors import Conflict, FieldError, NotFound, ValidationFailed
from pipeline.events import record_event
from pipeline.grammar import normalize_email
from pipeline.inbound_auth import authenticate
from pipeline.inbound_mime import ParsedMessage, parse_message
from storage import domains as domain_store
from storage import inbound as store
from storage.db import Database
from storage.models import InboundAttachment, InboundMessage, InboundRoute

EVENT = "email.received"
_LOCAL_PART = re.compile(r"[^\s@\x00-\x1f\x7f\"]+")
"""A recipient's local part a route may match: unquoted, without white space, controls or a second @."""


def normalize_pattern(pattern: str) -> tuple[str, str]:
    """(the stored pattern, its domain): `*@domain` or an exact address, lower case; 422 otherwise."""
    local, at, domain = pattern.rpartition("@")
    problem = None
    if not at:
        problem = "A pattern is '*@<domain>' or an address, e.g. support@example.com"
    elif local == "*":
        try:
            domain = domain_rules.normalize_domain(domain)
        except ValidationFailed:
            problem = f"'{domain}' is not a domain name"
    elif "*" in local:
        problem = "The only wildcard is the whole local part: '*@<domain>'"
    else:
        try:
            address = normalize_email(pattern)
        except PydanticCustomError as exc:
            problem = str(exc)
        else:
            return address, address.rpartition("@")[2]
    if problem:
        raise ValidationFailed([FieldError("pattern", problem, "invalid_string")])
    return f"*@{domain}", domain


def add_route(session: Session, project_id: str, pattern: str, max_routes: int) -> InboundRoute:
    """Run it alone (`Database.write(..., alone=True)`): patterns are unique across projects, and two projects'
    additions in one shared batch lock their projects' domains in one order while another batch holds them in
    the other, waiting on each other's new pattern (PostgreSQL ends one with a deadlock: a 500). Alone, the
    later insert waits for the earlier commit and gets its 409."""
    stored, domain_name = normalize_pattern(pattern)
    domain = _owning_domain(session, project_id, domain_name)
    domain_store.lock_project_domains(session, project_id)
    if store.route_by_pattern(session, stored) is not None:
        raise _already_routed(stored)
    if store.count_routes(session, project_id) >= max_routes:
        raise ValidationFailed([FieldError("pattern", f"A project can have at most {max_routes} routes "
                                                      "(routes.max_per_project)", "too_many_routes")],
                               message=f"This project has reached its limit of {max_routes} inbound routes",
                               suggestion="Delete a route the project no longer uses, or raise "
                                          "routes.max_per_project.")
    try:
        with session.begin_nested():
            return store.insert_route(session, project_id, domain.id, stored)
    except IntegrityError:
        raise _already_routed(stored) from None


def _already_routed(pattern: str) -> Conflict:
    """Another route has the pattern: this project's, or another's (added meanwhile, for the insert)."""
    return Conflict(f"{pattern} is already routed", "Delete the existing route first (DELETE /inbound/routes/:id).")


def _owning_domain(session: Session, project_id: str, name: str) -> Any:
    """The project's verified domain `name` or its nearest verified parent; 422 naming the problem."""
    labels = name.split(".")
    candidates = [".".join(labels[i:]) for i in range(len(labels) - 1)]
    found = [d for d in (domain_store.get_domain(session, project_id, c) for c in candidates) if d is not None]
    verified = [d for d in found if d.verified]
    if verified:
        return verified[0]
    if found:
        message = f"Domain {found[0].name} of this project is not verified"
        suggestion = f"Publish its records, then POST /domains/{found[0].id}/verify."
    else:
        message = f"{name} is not a domain of this project"
        suggestion = "Add it (or a parent domain) with POST /domains and verify it first."
    raise ValidationFailed([FieldError("pattern", message, "unverified_domain")], message=message,
                           suggestion=suggestion)


def delete_route(session: Session, project_id: str, route_id: str) -> InboundRoute:
    route = store.get_route(session, project_id, route_id)
    if route is None:
        raise NotFound(f"Route {route_id} not found", "Check the id; it must belong to this project.")
    store.delete_route(session, route)
    return route


def route_json(route: InboundRoute) -> dict[str, Any]:
    return {"id": route.id, "pattern": route.pattern, "domainId": route.domain_id, "createdAt": route.created_at}


@dataclass(frozen=True)
class RouteMatch:
    """What `RouteBook.match` found for a recipient: the route and its project."""

    route_id: str
    project_id: str
    pattern: str
    recipient: str


class RouteBook:
    """What the inbound SMTP server asks: `match` at RCPT, `receive` after DATA (before its 250).

    `receive` raises `pipeline.inbound_mime.MessageRefused` for a message over the parser's bounds (its
    `reply` is the SMTP reply to give); anything it stores is committed when it returns. Parsing (up to
    `smtp.max_message_bytes`) runs in a thread, so a big message does not stall the event loop."""

    def __init__(self, db: Database, config: Config) -> None:
        self.db = db
        self.config = config

    async def match(self, address: str) -> RouteMatch | None:
        """The route of a verified domain for `address` (any case), exact before wildcard; None otherwise."""
        address = address.lower()
        local, at, domain = address.rpartition("@")
        if (not local or not at or len(local) > 64 or len(address) > 320 or not _LOCAL_PART.fullmatch(local)
                or not domain_rules.DOMAIN_PATTERN.fullmatch(domain)):
            return None
        route = await self.db.read(store.matching_route, address, domain)
        if route is None:
            return None
        return RouteMatch(route.id, route.project_id, route.pattern, address)

    async def receive(self, matches: Sequence[RouteMatch], raw: bytes, envelope_from: str, client_ip: str,
                      helo: str) -> None:
        """One message for its routed recipients: parsed and authenticated once, recorded for each in one
        transaction (a failure records none, so the client's retry duplicates nothing)."""
        settings = self.config.routes
        parsed = await asyncio.to_thread(parse_message, raw, self.config.smtp.max_message_bytes,
                                         settings.event_body_chars)
        from_domain = parsed.sender.rpartition("@")[2] if parsed.sender else None
        results = await authenticate(raw, envelope_from, client_ip, helo, from_domain, self.config.dns,
                                     settings.auth_timeout_seconds)
        contact_address = parsed.sender or _valid_address(envelope_from)
        await self.db.write(lambda s: [record_received(s, match, raw, parsed, results, contact_address,
                                                       envelope_from, client_ip, helo) for match in matches])


def _valid_address(address: str) -> str | None:
    try:
        return normalize_email(address) if address else None
    except PydanticCustomError:
        return None


def record_received(session: Session, match: RouteMatch, raw: bytes, parsed: ParsedMessage,
                    results: dict[str, Any], contact_address: str | None, envelope_from: str, client_ip: str,
                    helo: str) -> str:
    """Store the message and its attachments, record `email.received`; return the message's id."""
    message = InboundMessage(project_id=match.project_id, route_id=match.route_id, envelope_from=envelope_from[:320],
                             recipient=match.recipient, client_ip=client_ip[:64], helo=helo[:255], raw=raw)
    attachments = [InboundAttachment(filename=a.filename, content_type=a.content_type, size=len(a.data),
                                     data=a.data) for a in parsed.attachments]
    store.insert_message(session, message, attachments)
    contact_id = None
    if contact_address is not None:
        contact, _, _ = upsert_contact(session, match.project_id, contact_address, None, False)
        contact_id = contact.id
    data = {"id": message.id, **parsed.event_data(), "to": parsed.to or [match.recipient],
            "recipient": match.recipient, "envelopeFrom": envelope_from[:320], "route": match.pattern,
            "attachments": [{"id": a.id, "filename": a.filename, "contentType": a.content_type, "size": a.size}
                            for a in attachments], **results}
    event_id, _ = record_event(session, match.project_id, contact_id, EVENT, data)
    message.event_id = event_id
    session.flush()
    return message.id
