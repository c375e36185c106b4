"""A project's return-path choice for relayed mail: `GET /settings/return-path` and `PATCH /settings/return-path`.

Mail sent through the API, campaigns and workflows is always delivered with a VERP envelope sender once its
domain's return path is verified; mail relayed over SMTP keeps its client's MAIL FROM unless `verpRelay` is on."""

from __future__ import annotations

from aiohttp import web

from api.context import DB
from api.envelope import success
from api.routing import Route, caller
from api.schemas import Out
from api.validation import Body, read_body
from storage import projects as project_store


class ReturnPathSettingsBody(Body):
    verpRelay: bool


class ReturnPathSettingsOut(Out):
    verpRelay: bool


async def get_settings(request: web.Request) -> web.Response:
    chosen = await request.app[DB].read(project_store.verp_relay, caller(request).project_id)
    return success({"verpRelay": chosen})


async def change_settings(request: web.Request) -> web.Response:
    body = await read_body(request, ReturnPathSettingsBody)
    project_id = caller(request).project_id
    await request.app[DB].write(lambda s: project_store.set_verp_relay(s, project_id, body.verpRelay))
    return success({"verpRelay": body.verpRelay})


ROUTES = [
    Route("GET", "/settings/return-path", get_settings, "Whether relayed mail gets a VERP envelope sender",
          tag="Domains", response=ReturnPathSettingsOut),
    Route("PATCH", "/settings/return-path", change_settings,
          "Choose whether mail relayed over SMTP gets a VERP envelope sender (else it keeps its MAIL FROM)",
          body=ReturnPathSettingsBody, tag="Domains", response=ReturnPathSettingsOut),
]
