"""Templates: list, get, create, replace (PUT), update (PATCH), delete (409 while a campaign uses one)."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from aiohttp import web
from pydantic import ConfigDict, Field, StringConstraints

from api.context import DB
from api.envelope import success
from api.routing import Route, caller
from api.schemas import Out
from api.send import DisplayName, HeaderEmail, HeaderText
from api.serialize import page_json
from api.validation import PAGE_QUERY, Body, page_params, read_body
from pipeline.marketing import templates as rules
from storage import templates as template_store
from storage.models import Template

TemplateName = Annotated[str, StringConstraints(min_length=1, max_length=rules.MAX_NAME)]
TemplateText = Annotated[str, StringConstraints(max_length=rules.MAX_BODY)]
TemplateType = Literal["MARKETING", "TRANSACTIONAL"]
TemplateStyle = Literal["PLUNK", "HTML"]
FIELD_COLUMNS = {"name": "name", "subject": "subject", "body": "body", "type": "type", "style": "style",
                 "from_": "from_email", "fromName": "from_name", "reply": "reply_to"}
"""Body field → template column."""


def _no_null_defaults(schema: dict[str, Any]) -> None:
    """An omitted PATCH field keeps its value; `null` is no value of these types (and is refused), so the
    schema shows no `default: null` for them."""
    for prop in schema.get("properties", {}).values():
        if prop.get("default", ...) is None and "anyOf" not in prop:
            del prop["default"]


class TemplateBody(Body):
    """A whole template (POST, PUT). Unset type and style are MARKETING and PLUNK; unset from, fromName and
    reply fall back, at send time, to the project's sender."""

    name: TemplateName
    subject: HeaderText
    body: TemplateText
    type: TemplateType = "MARKETING"
    style: TemplateStyle = "PLUNK"
    from_: HeaderEmail | None = Field(default=None, alias="from")
    fromName: DisplayName | None = None
    reply: HeaderEmail | None = None


class PatchTemplateBody(Body):
    """The fields to change; `null` clears from, fromName or reply."""

    model_config = ConfigDict(json_schema_extra=_no_null_defaults)

    name: TemplateName = None  # type: ignore[assignment]
    subject: HeaderText = None  # type: ignore[assignment]
    body: TemplateText = None  # type: ignore[assignment]
    type: TemplateType = None  # type: ignore[assignment]
    style: TemplateStyle = None  # type: ignore[assignment]
    from_: HeaderEmail | None = Field(default=None, alias="from")
    fromName: DisplayName | None = None
    reply: HeaderEmail | None = None


class TemplateOut(Out):
    id: str
    name: str
    subject: str
    body: str
    type: TemplateType
    style: TemplateStyle
    from_: str | None = Field(alias="from")
    fromName: str | None
    reply: str | None
    projectId: str
    createdAt: datetime
    updatedAt: datetime


class TemplatePage(Out):
    items: list[TemplateOut]
    nextCursor: str | None
    hasMore: bool
    total: int = Field(ge=0)


def template_json(template: Template) -> dict[str, Any]:
    return {"id": template.id, "name": template.name, "subject": template.subject, "body": template.body,
            "type": template.type, "style": template.style, "from": template.from_email,
            "fromName": template.from_name, "reply": template.reply_to, "projectId": template.project_id,
            "createdAt": template.created_at, "updatedAt": template.updated_at}


def _columns(body: TemplateBody | PatchTemplateBody, given_only: bool) -> dict[str, Any]:
    fields = body.model_fields_set if given_only else FIELD_COLUMNS.keys()
    return {FIELD_COLUMNS[name]: getattr(body, name) for name in fields}


async def list_templates(request: web.Request) -> web.Response:
    limit, cursor = page_params(request)
    page = await request.app[DB].read(template_store.list_templates, caller(request).project_id, limit, cursor)
    return success(page_json(page, template_json))


async def get_template(request: web.Request) -> web.Response:
    template = await request.app[DB].read(rules.require_template, caller(request).project_id,
                                          request.match_info["id"])
    return success(template_json(template))


async def create_template(request: web.Request) -> web.Response:
    values = _columns(await read_body(request, TemplateBody), given_only=False)
    project_id = caller(request).project_id
    template = await request.app[DB].write(lambda s: rules.create_template(s, project_id, values))
    return success(template_json(template))


def _update(model: type[TemplateBody] | type[PatchTemplateBody]):
    async def handler(request: web.Request) -> web.Response:
        values = _columns(await read_body(request, model), given_only=model is PatchTemplateBody)
        project_id, template_id = caller(request).project_id, request.match_info["id"]
        template = await request.app[DB].write(lambda s: rules.update_template(s, project_id, template_id, values))
        return success(template_json(template))

    return handler


async def delete_template(request: web.Request) -> web.Response:
    project_id, template_id = caller(request).project_id, request.match_info["id"]
    template = await request.app[DB].write(lambda s: rules.delete_template(s, project_id, template_id))
    return success(template_json(template))


ROUTES = [
    Route("GET", "/templates", list_templates, "List templates, newest first", query=PAGE_QUERY, tag="Templates",
          response=TemplatePage, legacy="items"),
    Route("POST", "/templates", create_template, "Create a template", body=TemplateBody, tag="Templates",
          status=201, response=TemplateOut),
    Route("GET", "/templates/{id}", get_template, "Get a template", tag="Templates", response=TemplateOut),
    Route("PUT", "/templates/{id}", _update(TemplateBody), "Replace a template (omitted optional fields are reset)",
          body=TemplateBody, tag="Templates", response=TemplateOut),
    Route("PATCH", "/templates/{id}", _update(PatchTemplateBody), "Change some fields of a template",
          body=PatchTemplateBody, tag="Templates", response=TemplateOut),
    Route("DELETE", "/templates/{id}", delete_template, "Delete a template (409 while a campaign uses it)",
          tag="Templates", response=TemplateOut, errors=frozenset({409})),
]
