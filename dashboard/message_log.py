"""The message log (every email of a project, searchable, newest first), an email's page (timeline,
envelope, headers, a sandboxed preview, the raw MIME) and the suppression list."""

from __future__ import annotations

import asyncio
import json
from typing import Any
from urllib.parse import urlencode

from aiohttp import web

from dashboard.context import DB
from dashboard.routing import Answer, Ctx, Page
from pipeline import message_log
from pipeline.errors import NotFound, ValidationFailed
from storage import message_log as store
from storage.models import Email, EmailStatus, Event, Role

EVENT_LABELS = {"email.sent": "Sent", "email.delivery": "Delivered", "email.open": "Opened",
                "email.click": "Clicked", "email.bounce": "Bounced", "email.complaint": "Complained",
                "contact.unsubscribed": "Contact unsubscribed"}
EVENT_DETAIL = 300
BAD_STATUSES = {EmailStatus.FAILED, EmailStatus.BOUNCED, EmailStatus.COMPLAINED, EmailStatus.SUPPRESSED,
                EmailStatus.CANCELLED}
GOOD_STATUSES = {EmailStatus.SENT, EmailStatus.DELIVERED}


def tone(status: str) -> str:
    return "ok" if status in GOOD_STATUSES else "bad" if status in BAD_STATUSES else "warn"


def listed_email(row: Any) -> dict[str, Any]:
    return {"id": row.id, "recipient": row.recipient, "sender": row.sender, "subject": row.subject,
            "status": row.status, "tone": tone(row.status), "source": row.source, "createdAt": row.created_at,
            "sentAt": row.sent_at}


async def email_list(ctx: Ctx) -> Answer:
    """GET /projects/{project}/emails: the log, filtered by the query string (a bad value: 422, the form
    shown again with what is wrong)."""
    base = {"statuses": list(message_log.STATUSES), "sources": list(message_log.SOURCES),
            "pageSizes": list(message_log.PAGE_SIZES), "scanWindow": store.SCAN_WINDOW}
    try:
        search = message_log.log_search(ctx.request.query)
    except ValidationFailed as exc:
        shown = {name: ctx.request.query.get(name, "")[:message_log.MAX_SEARCH] for name in
                 ("recipient", "match", "subject", "subjectMatch", "status", "source", "from", "to", "limit")}
        shown["limit"] = shown["limit"] or str(message_log.DEFAULT_PAGE_SIZE)
        return Answer("emails.html", {**base, "emails": [], "search": shown, "nextCursor": None,
                                      "searchedTo": None, "errors": [e.as_dict() for e in exc.errors],
                                      "message": exc.message, "firstPage": True}, status=422)
    page = await ctx.request.app[DB].read(store.search_emails, ctx.project_id, search.wanted, search.limit,
                                          search.cursor)
    return Answer("emails.html", {**base, "emails": [listed_email(row) for row in page.rows],
                                  "search": search.shown, "nextCursor": page.next_cursor,
                                  "nextQuery": next_query(search.shown, page.next_cursor),
                                  "searchedTo": page.searched_to, "errors": [], "firstPage": search.cursor is None})


def next_query(shown: dict[str, str], cursor: str | None) -> str | None:
    """The query string of the next page: the same search below `cursor`."""
    return None if cursor is None else urlencode({**{k: v for k, v in shown.items() if v}, "cursor": cursor})


def timeline(email: Email, events: list[Event]) -> list[dict[str, Any]]:
    """What happened to the email, oldest first: queued, then its events (a bounce with the remote reply),
    then, for an email settled without an event, its status and error."""
    steps: list[dict[str, Any]] = [{"at": email.created_at, "what": "Queued", "detail": f"from {email.source}",
                                    "tone": ""}]
    names = {event.name for event in events}
    if email.sent_at is not None and "email.sent" not in names:
        steps.append({"at": email.sent_at, "what": "Sent", "detail": email.transport_id or "", "tone": "ok"})
    for event in events:
        data = event.data or {}
        if event.name == "email.bounce":
            detail = str(data.get("diagnosticCode") or data.get("status") or "")
        elif event.name == "email.sent":
            detail = str(data.get("messageId") or "")
        else:
            detail = json.dumps(data, ensure_ascii=False, sort_keys=True) if data else ""
        steps.append({"at": event.created_at, "what": EVENT_LABELS.get(event.name, event.name),
                      "event": event.name, "detail": detail[:EVENT_DETAIL],
                      "tone": "bad" if event.name in ("email.bounce", "email.complaint") else "ok"})
    if email.status in BAD_STATUSES | {EmailStatus.SKIPPED} and not names & {"email.bounce", "email.complaint"}:
        steps.append({"at": None, "what": email.status.title(), "detail": email.error or "",
                      "tone": tone(email.status)})
    return steps


async def email_page(ctx: Ctx) -> Answer:
    """GET /projects/{project}/emails/{email}: timeline, envelope, headers, preview, attachments."""
    found = await ctx.request.app[DB].read(store.email_record, ctx.project_id, ctx.request.match_info["email"][:64])
    if found is None:
        raise NotFound("No such email in this project")
    email, content = found.email, found.content
    data: dict[str, Any] = {
        "email": {**listed_email(email), "envelopeSender": email.envelope_sender or email.sender,
                  "messageId": email.message_id, "transportId": email.transport_id, "error": email.error,
                  "contactId": email.contact_id, "campaignId": email.campaign_id},
        "queue": None if found.outbox is None else {"attempts": found.outbox.attempts,
                                                    "lastError": found.outbox.last_error,
                                                    "dueAt": found.outbox.due_at},
        "timeline": timeline(email, found.events), "eventsCut": len(found.events) >= store.EVENTS_SHOWN,
        "content": {"state": "pruned" if content is None or not content.raw else
                    "deferred" if content.deferred else "stored"}}
    if data["content"]["state"] == "stored":
        assert content is not None
        view = await asyncio.to_thread(message_log.read_message, content.raw)
        data["content"].update({"headers": [list(pair) for pair in view.headers], "hasHtml": view.html is not None,
                                "text": view.text, "problem": view.problem, "size": len(content.raw),
                                "attachments": [{"filename": a.filename, "contentType": a.content_type, "size": a.size}
                                                for a in view.attachments]})
    return Answer("email.html", data)


async def _stored_message(ctx: Ctx) -> tuple[Email, bytes]:
    found = await ctx.request.app[DB].read(store.email_content, ctx.project_id, ctx.request.match_info["email"][:64])
    if found is None:
        raise NotFound("No such email in this project")
    email, content = found
    if content is None or not content.raw:
        raise NotFound("This email's contents were removed by retention")
    if content.deferred:
        raise NotFound("This email is composed when it is sent: there is no MIME message yet")
    return email, content.raw


async def email_preview(ctx: Ctx) -> web.StreamResponse:
    """GET .../emails/{email}/preview: the HTML part alone, for the sandboxed frame of the email's page."""
    _, raw = await _stored_message(ctx)
    html = (await asyncio.to_thread(message_log.read_message, raw)).html
    if html is None:
        raise NotFound("This email has no HTML part")
    return web.Response(text=html, content_type="text/html", charset="utf-8")


async def email_raw(ctx: Ctx) -> web.StreamResponse:
    """GET .../emails/{email}/raw: the stored MIME message, as a download."""
    email, raw = await _stored_message(ctx)
    return web.Response(body=raw, content_type="message/rfc822",
                        headers={"Content-Disposition": f'attachment; filename="email-{email.id}.eml"'})


async def suppression_list(ctx: Ctx) -> Answer:
    """GET /projects/{project}/suppressions: newest first, searchable by address prefix."""
    try:
        prefix, cursor, shown = message_log.suppression_search(ctx.request.query)
    except ValidationFailed as exc:
        return Answer("suppressions.html", {"suppressions": [], "search": {"email": ""}, "nextCursor": None,
                                            "errors": [e.as_dict() for e in exc.errors], "message": exc.message,
                                            "firstPage": True}, status=422)
    rows, next_cursor = await ctx.request.app[DB].read(store.list_suppressions, ctx.project_id, prefix,
                                                       message_log.DEFAULT_PAGE_SIZE, cursor)
    return Answer("suppressions.html", {
        "suppressions": [{"id": row.id, "email": row.email, "reason": row.reason, "emailId": row.email_id,
                          "createdAt": row.created_at} for row in rows],
        "search": shown, "nextCursor": next_cursor, "nextQuery": next_query(shown, next_cursor), "errors": [],
        "firstPage": cursor is None})


async def remove_suppression(ctx: Ctx) -> Answer:
    """POST .../suppressions/{suppression}/remove (editor and up): mail to the address is sent again."""
    suppression_id = ctx.request.match_info["suppression"][:64]
    address = await message_log.lift_suppression(ctx.request.app[DB], ctx.project_id, suppression_id)
    return Answer(redirect=f"/projects/{ctx.project_id}/suppressions", flash=f"{address} is no longer suppressed",
                  data={"removed": suppression_id, "email": address})


ROUTES = [
    Page("GET", "/projects/{project}/emails", email_list),
    Page("GET", "/projects/{project}/emails/{email}", email_page),
    Page("GET", "/projects/{project}/emails/{email}/preview", email_preview, sandboxed=True),
    Page("GET", "/projects/{project}/emails/{email}/raw", email_raw),
    Page("GET", "/projects/{project}/suppressions", suppression_list),
    Page("POST", "/projects/{project}/suppressions/{suppression}/remove", remove_suppression, role=Role.EDITOR),
]
