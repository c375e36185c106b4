"""Contacts: list, get, count, create, update, delete, subscribe, unsubscribe."""

from __future__ import annotations

import asyncio
import logging
from typing import Annotated

from aiohttp import web
from pydantic import ConfigDict, StringConstraints, model_validator

from api.context import DB
from api.envelope import encode_json, success
from api.routing import DIALECT, Route, caller
from api.schemas import ContactOut, ContactPage, Count
from api.serialize import contact_json, page_json
from api.validation import (
    BOOL_QUERY,
    NO_NUL,
    PAGE_QUERY,
    Body,
    Data,
    Email,
    bool_param,
    page_params,
    read_body,
    text_param,
)
from pipeline import contacts as rules
from storage import contacts as contact_store

log = logging.getLogger("plunkd.api")
ContactId = Annotated[str, StringConstraints(min_length=1, max_length=64)]
MAX_SEARCH = 320
STREAM_PAGE_SIZE = 500
"""Contacts read per query while the legacy dialect streams them all."""
STREAM_WRITE_SECONDS = 60
"""A client that takes longer than this to take one page of the stream is cut off."""


class CreateContactBody(Body):
    email: Email
    subscribed: bool = True
    data: Data = None


class UpdateContactBody(Body):
    id: ContactId
    email: Email | None = None
    subscribed: bool | None = None
    data: Data = None


class PatchContactBody(Body):
    email: Email | None = None
    subscribed: bool | None = None
    data: Data = None


class ContactRefBody(Body):
    id: ContactId | None = None
    email: Email | None = None

    model_config = ConfigDict(json_schema_extra={"anyOf": [
        {"required": ["id"], "properties": {"id": {"type": "string"}}},
        {"required": ["email"], "properties": {"email": {"type": "string"}}}]})

    @model_validator(mode="after")
    def one_of_id_or_email(self):
        if self.id is None and self.email is None:
            raise ValueError("Give the contact's id or email")
        return self


class DeleteContactBody(Body):
    id: ContactId


async def list_contacts(request: web.Request) -> web.StreamResponse:
    """A page; in the legacy dialect (seed 002: "Get all contacts") every contact, streamed, unless the caller
    asks for a page with `limit` or `cursor`."""
    subscribed = bool_param(request, "subscribed")
    search = text_param(request, "search", MAX_SEARCH)
    if request.get(DIALECT) is not None and not {"limit", "cursor"} & request.query.keys():
        return await stream_all_contacts(request, subscribed, search)
    limit, cursor = page_params(request)
    page = await request.app[DB].read(contact_store.list_contacts, caller(request).project_id, limit, cursor,
                                      subscribed, search)
    return success(page_json(page, contact_json))


async def stream_all_contacts(request: web.Request, subscribed: bool | None, search: str | None) -> web.StreamResponse:
    """The JSON array of every matching contact, newest first, written in chunks as it is read by keyset pages
    of `STREAM_PAGE_SIZE` (each its own short read), so no list of all contacts is ever built and a slow
    reader holds no transaction open. A failure mid-stream (or a reader stalled `STREAM_WRITE_SECONDS` on
    one page) cuts the connection: the client sees a broken reply, never a well-formed array that silently
    lacks contacts."""
    db, project_id = request.app[DB], caller(request).project_id
    response = web.StreamResponse(headers={"Content-Type": "application/json; charset=utf-8"})
    response.enable_chunked_encoding()
    await response.prepare(request)
    opening, after, count = b"[", None, 0
    try:
        while True:
            page = await db.read(contact_store.contacts_after, project_id, after, STREAM_PAGE_SIZE, subscribed,
                                 search)
            if page:
                async with asyncio.timeout(STREAM_WRITE_SECONDS):
                    await response.write(opening + b",".join(encode_json(contact_json(c)) for c in page))
                opening, after, count = b",", page[-1].id, count + len(page)
            if len(page) < STREAM_PAGE_SIZE:
                break
    except (ConnectionError, TimeoutError) as exc:
        log.info("streaming contacts of project %s stopped after %d: the client left or stalled (%s)", project_id,
                 count, type(exc).__name__)
        return _cut(request, response)
    except Exception:
        log.exception("streaming contacts of project %s failed after %d; connection cut", project_id, count)
        return _cut(request, response)
    await response.write(b"[]" if opening == b"[" else b"]")
    await response.write_eof()
    return response


def _cut(request: web.Request, response: web.StreamResponse) -> web.StreamResponse:
    if request.transport is not None:
        request.transport.abort()
    return response


async def count_contacts(request: web.Request) -> web.Response:
    count = await request.app[DB].read(contact_store.count_contacts, caller(request).project_id)
    return success({"count": count})


async def get_contact(request: web.Request) -> web.Response:
    contact = await request.app[DB].read(rules.require_contact, caller(request).project_id, request.match_info["id"])
    return success(contact_json(contact))


async def create_contact(request: web.Request) -> web.Response:
    body = await read_body(request, CreateContactBody)
    project_id = caller(request).project_id
    contact = await request.app[DB].write(
        lambda s: rules.create_contact(s, project_id, body.email, body.subscribed, body.data))
    return success(contact_json(contact))


async def _update(request: web.Request, contact_id: str, body: PatchContactBody | UpdateContactBody) -> web.Response:
    project_id = caller(request).project_id
    contact = await request.app[DB].write(
        lambda s: rules.update_contact(s, project_id, contact_id, body.email, body.subscribed, body.data))
    return success(contact_json(contact))


async def put_contact(request: web.Request) -> web.Response:
    body = await read_body(request, UpdateContactBody)
    return await _update(request, body.id, body)


async def patch_contact(request: web.Request) -> web.Response:
    body = await read_body(request, PatchContactBody)
    return await _update(request, request.match_info["id"], body)


async def _delete(request: web.Request, contact_id: str) -> web.Response:
    project_id = caller(request).project_id
    contact = await rules.delete(request.app[DB], project_id, contact_id)
    return success(contact_json(contact))


async def delete_contact_by_body(request: web.Request) -> web.Response:
    body = await read_body(request, DeleteContactBody)
    return await _delete(request, body.id)


async def delete_contact_by_path(request: web.Request) -> web.Response:
    return await _delete(request, request.match_info["id"])


def _subscription(subscribed: bool):
    async def handler(request: web.Request) -> web.Response:
        body = await read_body(request, ContactRefBody)
        project_id = caller(request).project_id
        contact = await request.app[DB].write(
            lambda s: rules.set_subscribed(s, project_id, body.id, body.email, subscribed))
        return success(contact_json(contact))

    return handler


ROUTES = [
    Route("GET", "/contacts", list_contacts, "List contacts, newest first",
          query={**PAGE_QUERY, "subscribed": BOOL_QUERY,
                 "search": {"type": "string", "maxLength": MAX_SEARCH, "pattern": NO_NUL}},
          tag="Contacts", response=ContactPage, legacy="items"),
    Route("POST", "/contacts", create_contact, "Create a contact", body=CreateContactBody, tag="Contacts",
          status=201, seed_status=200, response=ContactOut, errors=frozenset({409})),
    Route("PUT", "/contacts", put_contact, "Update a contact (id in the body)", body=UpdateContactBody,
          tag="Contacts", response=ContactOut, errors=frozenset({404, 409})),
    Route("DELETE", "/contacts", delete_contact_by_body, "Delete a contact (id in the body)",
          body=DeleteContactBody, tag="Contacts", response=ContactOut, errors=frozenset({404})),
    Route("GET", "/contacts/count", count_contacts, "Count contacts", tag="Contacts", response=Count,
          legacy="bare"),
    Route("POST", "/contacts/subscribe", _subscription(True), "Subscribe a contact", body=ContactRefBody,
          tag="Contacts", response=ContactOut, errors=frozenset({404})),
    Route("POST", "/contacts/unsubscribe", _subscription(False), "Unsubscribe a contact", body=ContactRefBody,
          tag="Contacts", response=ContactOut, errors=frozenset({404})),
    Route("GET", "/contacts/{id}", get_contact, "Get a contact", tag="Contacts", response=ContactOut),
    Route("PATCH", "/contacts/{id}", patch_contact, "Update a contact", body=PatchContactBody, tag="Contacts",
          response=ContactOut, errors=frozenset({409})),
    Route("DELETE", "/contacts/{id}", delete_contact_by_path, "Delete a contact", tag="Contacts",
          response=ContactOut),
]
