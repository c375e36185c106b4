"""Deferred composition: mail queued as a message spec and composed for its recipient when it is sent.

A campaign's emails, and the emails a workflow's send step queues in one batch, share one *deferred*
content: the spec (sender, subject, body, style, whether it is marketing mail) as JSON. Each email row may
carry its own variables (a workflow run's event data). The dispatcher composes the recipient's MIME from
the spec, the contact as it is at send time and those variables (`DeferredComposer`), so queueing writes
small rows and no MIME, and a contact who unsubscribes before marketing mail goes out gets nothing.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Any

from sqlalchemy.orm import Session

from pipeline.cache import TtlCache
from pipeline.compose import MessageSpec
from pipeline.links import LinkSigner
from storage import contacts as contact_store
from storage import emails as email_store
from storage.emails import Claimed

INLINE_COMPOSE_BYTES = 256_000
"""A body that renders larger is composed in a thread: a few megabytes of HTML take seconds (the text
part is parsed out of it), and the dispatcher's event loop keeps sending meanwhile."""


def spec_to_json(spec: MessageSpec) -> bytes:
    """The spec as stored; headers and attachments are not part of what a campaign or workflow sends."""
    return json.dumps({"from_email": spec.from_email, "from_name": spec.from_name, "subject": spec.subject,
                       "body": spec.body, "reply_to": spec.reply_to, "style": spec.style,
                       "campaign_id": spec.campaign_id, "feedback_id": spec.feedback_id,
                       "marketing": spec.links is not None}).encode()


def spec_from_json(raw: bytes, links: LinkSigner) -> MessageSpec:
    fields = json.loads(raw)
    marketing = fields.pop("marketing", True)
    return MessageSpec(**fields, links=links if marketing else None)


def insert_spec(session: Session, project_id: str, spec: MessageSpec) -> str:
    """Store `spec` as deferred content; returns its id."""
    return email_store.insert_deferred_content(session, project_id, spec_to_json(spec))


class DeferredComposer:
    """Composes a deferred email when the dispatcher sends it (delivery cannot import pipeline, so the
    wiring hands it this callable). None: do not send it (the contact was deleted, or marketing mail's
    contact is no longer subscribed). A message that would be larger than `max_bytes` raises
    `MessageTooLarge` (the dispatcher fails the email with its reason)."""

    def __init__(self, read: Callable[..., Any], links: LinkSigner, max_bytes: int | None = None) -> None:
        self._read = read
        self._links = links
        self._max_bytes = max_bytes
        self._specs: TtlCache[str, MessageSpec] = TtlCache(300.0, max_entries=64)

    async def __call__(self, item: Claimed) -> bytes | None:
        if item.contact_id is None:
            return None
        spec = self._specs.get(item.content_id)
        if spec is None:
            spec = spec_from_json(item.raw, self._links)
            self._specs.put(item.content_id, spec)
        contact = await self._read(contact_store.get_contact, item.project_id, item.contact_id)
        if contact is None or spec.links is not None and not contact.subscribed:
            return None
        variables = {**(contact.data or {}), **(item.variables or {}), "plunk_id": contact.id,
                     "plunk_email": contact.email}
        if spec.template(spec.body).size(variables) > INLINE_COMPOSE_BYTES:
            return await asyncio.to_thread(spec.build, contact.email, variables, self._max_bytes)
        return spec.build(contact.email, variables, self._max_bytes)
