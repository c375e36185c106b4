"""Inbound routes (`/inbound/routes`) and the routed messages: their raw bytes and attachments."""

from __future__ import annotations

from typing import Annotated
from urllib.parse import quote

from aiohttp import web
from pydantic import StringConstraints, WithJsonSchema

from api.context import CONFIG, DB
from api.envelope import success
from api.routing import Route, caller
from api.schemas import InboundRouteOut, InboundRoutePage
from api.serialize import page_json
from api.validation import PAGE_QUERY, Body, page_params, read_body
from pipeline import inbound_routes as rules
from pipeline.domains import DOMAIN_NAME
from pipeline.errors import NotFound
from storage import inbound as store

DOWNLOAD_HEADERS = {"X-Content-Type-Options": "nosniff", "Content-Security-Policy": "sandbox",
                    "Cache-Control": "private, no-store"}
"""A stored message or attachment is the sender's content: never rendered or sniffed as a page of ours."""


class AddRouteBody(Body):
    pattern: Annotated[str, StringConstraints(min_length=3, max_length=320),
                       WithJsonSchema({"type": "string", "minLength": 3, "maxLength": 320,
                                       "pattern": f"^(\\*|[^@\\s\"*]+)@{DOMAIN_NAME}$",
                                       "description": "An address, or *@<domain> for every address of the domain"})]


async def add_route(request: web.Request) -> web.Response:
    body = await read_body(request, AddRouteBody)
    project_id, limit = caller(request).project_id, request.app[CONFIG].routes.max_per_project
    route = await request.app[DB].write(lambda s: rules.add_route(s, project_id, body.pattern, limit),
                                         alone=True)
    return success(rules.route_json(route))


async def list_routes(request: web.Request) -> web.Response:
    limit, cursor = page_params(request)
    page = await request.app[DB].read(store.page_routes, caller(request).project_id, limit, cursor)
    return success(page_json(page, rules.route_json))


async def delete_route(request: web.Request) -> web.Response:
    project_id, route_id = caller(request).project_id, request.match_info["id"]
    route = await request.app[DB].write(lambda s: rules.delete_route(s, project_id, route_id))
    return success(rules.route_json(route))


async def raw_message(request: web.Request) -> web.Response:
    message = await request.app[DB].read(store.get_message, caller(request).project_id, request.match_info["id"])
    if message is None:
        raise NotFound(f"Inbound message {request.match_info['id']} not found",
                       "Use the id of an email.received event's data; messages are kept delivery.keep_content_days.")
    return web.Response(body=message.raw, content_type="message/rfc822",
                        headers={**DOWNLOAD_HEADERS,
                                 "Content-Disposition": f'attachment; filename="{message.id}.eml"'})


async def attachment(request: web.Request) -> web.Response:
    message_id, attachment_id = request.match_info["id"], request.match_info["attachmentId"]
    found = await request.app[DB].read(store.get_attachment, caller(request).project_id, message_id, attachment_id)
    if found is None:
        raise NotFound(f"Attachment {attachment_id} of inbound message {message_id} not found",
                       "Use the ids of an email.received event's data.attachments.")
    response = web.Response(body=found.data, headers={**DOWNLOAD_HEADERS,
                                                      "Content-Disposition": content_disposition(found.filename)})
    response.content_type = found.content_type
    return response


def content_disposition(filename: str) -> str:
    """`attachment` with an ASCII fallback name and the exact one (RFC 6266 / RFC 5987 `filename*`)."""
    fallback = "".join(c if 32 <= ord(c) < 127 and c not in '"\\%' else "_" for c in filename)
    return f"attachment; filename=\"{fallback}\"; filename*=UTF-8''{quote(filename, safe='')}"


ROUTES = [
    Route("POST", "/inbound/routes", add_route, "Route inbound mail for an address or *@domain (a verified "
          "domain of the project, or a subdomain of one) to email.received", body=AddRouteBody, tag="Inbound",
          status=201, response=InboundRouteOut, errors=frozenset({409})),
    Route("GET", "/inbound/routes", list_routes, "List inbound routes, newest first", query=PAGE_QUERY,
          tag="Inbound", response=InboundRoutePage, legacy="items"),
    Route("DELETE", "/inbound/routes/{id}", delete_route, "Delete an inbound route", tag="Inbound",
          response=InboundRouteOut),
    Route("GET", "/inbound/{id}/raw", raw_message, "The routed message as received (message/rfc822)",
          tag="Inbound", response=bytes, raw=True, media_type="message/rfc822"),
    Route("GET", "/inbound/{id}/attachments/{attachmentId}", attachment, "An attachment of a routed message, "
          "byte for byte, with its content type", tag="Inbound", response=bytes, raw=True,
          media_type="application/octet-stream"),
]
