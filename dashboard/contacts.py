"""The contacts pages: the list (email prefix, a data key, subscription; newest first or in email order with a
prefix, paged by cursor), the CSV export of the list's filter, one contact (data, events, emails, segments) and
its changes (data, subscription, deletion), the same rules as the API's."""

from __future__ import annotations

import asyncio
import csv
import io
import json
import logging
from typing import Any

from aiohttp import web

from dashboard.context import CONFIG, DB
from dashboard.routing import HEADERS, Answer, Ctx, Page, form_of
from pipeline import contacts as rules
from pipeline.contact_data import MAX_JSON_DEPTH, data_key_problems, data_size_problem, json_problems
from pipeline.errors import FieldError, ValidationFailed
from storage import contacts as contact_store
from storage.contacts import ContactFilter, ContactRecord
from storage.models import Role, iso
from storage.pagination import is_valid_cursor

log = logging.getLogger("plunkd.dashboard")
PAGE_SIZE = 50
TIMELINE_SIZE = 20
EXPORT_PAGE_SIZE = 500
EXPORT_WRITE_SECONDS = 60
"""A client that takes longer than this to take one chunk of an export is cut off."""
MAX_PREFIX = 320
MAX_KEY = 200
MAX_VALUE = 1000
STATES = {"all": None, "subscribed": True, "unsubscribed": False}
FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")
"""A CSV cell starting with one of these is a formula to a spreadsheet: the export puts a ' before it."""


def contact_filter(query: Any) -> tuple[ContactFilter, str | None, dict[str, str]]:
    """The list's query string as (filter, cursor, the filter as given), or ValidationFailed naming each bad
    parameter: every parameter is bounded in length and allowed values."""
    errors = []
    given = {name: query.get(name, "") for name in ("q", "key", "value", "state", "after")}
    prefix = given["q"].strip().lower()
    key, value, state = given["key"].strip(), query.get("value"), given["state"] or "all"
    if len(prefix) > MAX_PREFIX or "\x00" in prefix:
        errors.append(FieldError("q", f"An email prefix is at most {MAX_PREFIX} characters", "too_big"))
    if len(key) > MAX_KEY or "\x00" in key:
        errors.append(FieldError("key", f"A data key is at most {MAX_KEY} characters", "too_big"))
    if value is not None and (len(value) > MAX_VALUE or "\x00" in value):
        errors.append(FieldError("value", f"A value is at most {MAX_VALUE} characters", "too_big"))
    if state not in STATES:
        errors.append(FieldError("state", "Show all, subscribed or unsubscribed contacts", "invalid_enum_value"))
    after = given["after"] or None
    if after is not None and not (0 < len(after) <= MAX_PREFIX and "\x00" not in after if prefix
                                  else is_valid_cursor(after)):
        errors.append(FieldError("after", "This page link is not one the list made; start again from the first page",
                                 "invalid_string"))
    if errors:
        raise ValidationFailed(errors, "The filter is not valid")
    chosen = ContactFilter(prefix, STATES[state], key, (value or None) if key else None)
    return chosen, after, {**given, "state": state}


def contact_json(contact: ContactRecord) -> dict[str, Any]:
    return {"id": contact.id, "email": contact.email, "subscribed": contact.subscribed, "data": contact.data,
            "createdAt": contact.created_at, "updatedAt": contact.updated_at}


async def contact_list(ctx: Ctx) -> Answer:
    try:
        chosen, after, given = contact_filter(ctx.request.query)
    except ValidationFailed as exc:
        data: dict[str, Any] = {"contacts": [], "next": None, "scanLimited": False, "filter": {}, "scanLimit": 0,
                "errors": [e.as_dict() for e in exc.errors]}
        return Answer("contacts.html", data, status=422)
    page = await ctx.request.app[DB].read(contact_store.browse_contacts, ctx.project_id, chosen, after, PAGE_SIZE)
    return Answer("contacts.html", {
        "contacts": [contact_json(c) for c in page.items], "next": page.next_cursor,
        "scanLimited": page.scan_limited, "scanLimit": contact_store.SCAN_LIMIT, "filter": given, "errors": [],
        "emailOrder": bool(chosen.prefix)})


def csv_cell(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
    return "'" + text if text.startswith(FORMULA_STARTS) else text


async def export(ctx: Ctx) -> web.StreamResponse:
    """The list's filter as CSV: email, subscribed, created_at, and the data as one JSON object per row (the
    keys differ from contact to contact; one column each would need a scan of every contact first). Written
    page by page as it is read, each page its own short read; a failure mid-way cuts the connection, so a
    partial file is never mistaken for a whole one."""
    request = ctx.request
    chosen, _after, _given = contact_filter(request.query)
    db = request.app[DB]
    response = web.StreamResponse(headers={
        **HEADERS, "Content-Type": "text/csv; charset=utf-8",
        "Content-Disposition": 'attachment; filename="contacts.csv"'})
    response.enable_chunked_encoding()
    await response.prepare(request)
    after, count = None, 0
    try:
        buffer = io.StringIO()
        writer = csv.writer(buffer)
        writer.writerow(["email", "subscribed", "created_at", "data"])
        while True:
            page = await db.read(contact_store.browse_contacts, ctx.project_id, chosen, after, EXPORT_PAGE_SIZE)
            for contact in page.items:
                writer.writerow([csv_cell(contact.email), "true" if contact.subscribed else "false",
                                 iso(contact.created_at), csv_cell(contact.data or {})])
            async with asyncio.timeout(EXPORT_WRITE_SECONDS):
                await response.write(buffer.getvalue().encode())
            buffer.seek(0)
            buffer.truncate()
            count += len(page.items)
            if page.next_cursor is None:
                break
            after = page.next_cursor
    except (ConnectionError, TimeoutError) as exc:
        log.info("export of project %s stopped after %d contacts: %s", ctx.project_id, count, type(exc).__name__)
        return _cut(request, response)
    except Exception:
        log.exception("export of project %s failed after %d contacts; connection cut", ctx.project_id, count)
        return _cut(request, response)
    await response.write_eof()
    return response


def _cut(request: web.Request, response: web.StreamResponse) -> web.StreamResponse:
    if request.transport is not None:
        request.transport.abort()
    return response


def _cursor(ctx: Ctx, name: str) -> str | None:
    value = ctx.request.query.get(name)
    if value is not None and not is_valid_cursor(value):
        raise ValidationFailed([FieldError(name, "This page link is not one the page made", "invalid_string")])
    return value


async def contact_page(ctx: Ctx, errors: list[FieldError] | None = None, draft: str | None = None,
                       status: int = 200) -> Answer:
    db = ctx.request.app[DB]
    contact_id = ctx.request.match_info["contact"][:64]
    contact = await db.read(rules.require_contact, ctx.project_id, contact_id)
    events, events_next = await db.read(contact_store.contact_events, contact.id, _cursor(ctx, "events_after"),
                                        TIMELINE_SIZE)
    emails, emails_next = await db.read(contact_store.contact_emails, contact.id, _cursor(ctx, "emails_after"),
                                        TIMELINE_SIZE)
    segments = await db.read(contact_store.contact_segments, contact.id)
    return Answer("contact.html", {
        "contact": contact_json(contact),
        "events": [{"id": e.id, "name": e.name, "data": e.data, "emailId": e.email_id, "createdAt": e.created_at}
                   for e in events],
        "eventsNext": events_next,
        "emails": [{"id": e.id, "subject": e.subject, "status": e.status, "source": e.source,
                    "createdAt": e.created_at} for e in emails],
        "emailsNext": emails_next,
        "segments": [{"id": s.id, "name": s.name, "slug": s.slug, "enteredAt": s.entered_at} for s in segments],
        "errors": [e.as_dict() for e in errors or []],
    }, status=status, extra={
        "draft": draft if draft is not None else json.dumps(contact.data or {}, indent=2, ensure_ascii=False),
        "rows": [(key, json.dumps(value, ensure_ascii=False)) for key, value in sorted((contact.data or {}).items())],
    })


def parse_data(raw: str, max_data_bytes: int) -> dict[str, Any]:
    """The data a form sends as JSON text, checked as the API's PATCH checks `data`: an object, at most
    `MAX_DATA_KEYS` keys of 1-200 characters, nested at most `MAX_JSON_DEPTH` deep, finite numbers, no lone
    surrogates, at most `api.max_data_bytes` as compact JSON."""
    if len(raw.encode()) > 4 * max_data_bytes:
        raise ValidationFailed([FieldError("data", f"data is over {max_data_bytes} bytes (api.max_data_bytes)",
                                           "too_big")])
    try:
        data = json.loads(raw or "{}")
    except RecursionError:
        raise ValidationFailed([FieldError("data", f"nested more than {MAX_JSON_DEPTH} levels deep",
                                           "too_deep")]) from None
    except ValueError as exc:
        raise ValidationFailed([FieldError("data", f"Not valid JSON: {exc}", "invalid_json")]) from None
    if not isinstance(data, dict):
        raise ValidationFailed([FieldError("data", "data must be a JSON object", "invalid_type")])
    errors = data_key_problems(data) or json_problems({"data": data})
    size = data_size_problem(data, max_data_bytes)
    if errors or size:
        raise ValidationFailed(errors + ([size] if size else []))
    return data


def _replace_data(session: Any, project_id: str, contact_id: str, data: dict[str, Any]) -> ContactRecord:
    """Make the contact's data `data` (a key left out of it is deleted) under the API's merge rules."""
    contact = rules.require_contact(session, project_id, contact_id)
    dropped = {key: None for key in contact.data or {} if key not in data}
    return rules.update_contact(session, project_id, contact_id, None, None, {**data, **dropped})


async def edit_data(ctx: Ctx) -> Answer:
    request = ctx.request
    raw = (await form_of(request)).get("data", "")
    contact_id = request.match_info["contact"][:64]
    try:
        data = parse_data(raw, request.app[CONFIG].api.max_data_bytes)
    except ValidationFailed as exc:
        return await contact_page(ctx, exc.errors, raw[:200_000], status=422)
    contact = await request.app[DB].write(lambda s: _replace_data(s, ctx.project_id, contact_id, data))
    return Answer(redirect=f"/projects/{ctx.project_id}/contacts/{contact.id}", flash="Data saved",
                  data=contact_json(contact))


def _subscription(subscribed: bool):
    async def handler(ctx: Ctx) -> Answer:
        contact_id = ctx.request.match_info["contact"][:64]
        contact = await ctx.request.app[DB].write(
            lambda s: rules.set_subscribed(s, ctx.project_id, contact_id, None, subscribed))
        return Answer(redirect=f"/projects/{ctx.project_id}/contacts/{contact.id}",
                      flash="Subscribed" if subscribed else "Unsubscribed", data=contact_json(contact))

    return handler


async def delete(ctx: Ctx) -> Answer:
    contact_id = ctx.request.match_info["contact"][:64]
    contact = await rules.delete(ctx.request.app[DB], ctx.project_id, contact_id)
    return Answer(redirect=f"/projects/{ctx.project_id}/contacts", flash=f"Deleted {contact.email}",
                  data=contact_json(contact))


ROUTES = [
    Page("GET", "/projects/{project}/contacts", contact_list),
    Page("GET", "/projects/{project}/contacts/export", export),
    Page("GET", "/projects/{project}/contacts/{contact}", contact_page),
    Page("POST", "/projects/{project}/contacts/{contact}/data", edit_data, role=Role.EDITOR),
    Page("POST", "/projects/{project}/contacts/{contact}/subscribe", _subscription(True), role=Role.EDITOR),
    Page("POST", "/projects/{project}/contacts/{contact}/unsubscribe", _subscription(False), role=Role.EDITOR),
    Page("POST", "/projects/{project}/contacts/{contact}/delete", delete, role=Role.EDITOR),
]
