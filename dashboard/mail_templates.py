"""Templates: the list, the editor (subject and body beside a live preview), duplicate, delete, a test send.

The preview goes through the sending path itself (`pipeline.marketing.template_preview`): the editor posts
its fields (htmx, debounced, or the Preview button without JavaScript); the answer names a draft, kept one
per user and project, that the `<iframe sandbox>` loads from its own route under a CSP of its own (no
script, no same origin, no network but data: images), so a hostile body cannot reach the dashboard."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from dashboard.context import CONFIG, DB, LINKS, ON_QUEUED
from dashboard.routing import Answer, Ctx, Page, form_of, live_fragment
from pipeline import accounts
from pipeline.compose import is_safe_header_value
from pipeline.errors import Conflict, FieldError, NotFound, ValidationFailed
from pipeline.marketing import template_preview
from pipeline.marketing import templates as rules
from storage import templates as template_store
from storage.models import Role, Template
from storage.pagination import is_valid_cursor

PAGE_SIZE = 50


def template_json(template: Template) -> dict[str, Any]:
    return {"id": template.id, "name": template.name, "subject": template.subject, "body": template.body,
            "type": template.type, "style": template.style, "from": template.from_email,
            "fromName": template.from_name, "reply": template.reply_to, "createdAt": template.created_at,
            "updatedAt": template.updated_at}


def template_values(fields: dict[str, str]) -> dict[str, Any]:
    """The posted editor fields as template columns (the pipeline checks them again)."""
    errors: list[FieldError] = []
    values: dict[str, Any] = {column: fields.get(field, "") for field, column in (
        ("name", "name"), ("subject", "subject"), ("body", "body"))}
    values["name"] = values["name"].strip()
    values["type"] = fields.get("type", "MARKETING")
    values["style"] = fields.get("style", "PLUNK")
    for field, limit in (("subject", 998), ("fromName", 200)):
        text = fields.get(field, "")
        if len(text) > limit or not is_safe_header_value(text):
            errors.append(FieldError(field, f"At most {limit} characters, on one line", "invalid_string"))
    values["from_name"] = fields.get("fromName", "").strip() or None
    for field, column in (("from", "from_email"), ("reply", "reply_to")):
        text = fields.get(field, "").strip()
        values[column] = None
        if text:
            try:
                values[column] = accounts.valid_email(text, field)
            except ValidationFailed as exc:
                errors += exc.errors
    try:
        rules.check_values(values)
    except ValidationFailed as exc:
        errors += exc.errors
    if errors:
        raise ValidationFailed(errors)
    return values


def _editor(ctx: Ctx, template: dict[str, Any] | None, status: int = 200, errors: list | None = None,
            problem: str = "") -> Answer:
    return Answer("template_edit.html", {"template": template, "errors": [e.as_dict() for e in errors or []],
                                         "problem": problem, "types": list(rules.TYPES),
                                         "styles": list(rules.STYLES)}, status=status)


async def list_templates(ctx: Ctx) -> Answer:
    cursor = ctx.request.query.get("cursor", "")
    if cursor and not is_valid_cursor(cursor):
        raise ValidationFailed([FieldError("cursor", "Not a cursor of this list", "invalid_cursor")])
    page = await ctx.request.app[DB].read(template_store.list_templates, ctx.project_id, PAGE_SIZE, cursor or None)
    return Answer("templates.html", {"templates": [
        {"id": t.id, "name": t.name, "subject": t.subject, "type": t.type, "style": t.style,
         "updatedAt": t.updated_at} for t in page.items], "nextCursor": page.next_cursor, "total": page.total})


async def new_template(ctx: Ctx) -> Answer:
    return _editor(ctx, None)


async def create_template(ctx: Ctx) -> Answer:
    fields = await form_of(ctx.request)
    try:
        values = template_values(fields)
    except ValidationFailed as exc:
        return _editor(ctx, fields, 422, exc.errors)
    template = await ctx.request.app[DB].write(lambda s: rules.create_template(s, ctx.project_id, values))
    return Answer(redirect=f"/projects/{ctx.project_id}/templates/{template.id}", flash="Template created",
                  data=template_json(template), status=201)


async def _template(ctx: Ctx) -> Template:
    return await ctx.request.app[DB].read(rules.require_template, ctx.project_id,
                                          ctx.request.match_info["template"][:64])


async def show_template(ctx: Ctx) -> Answer:
    return _editor(ctx, template_json(await _template(ctx)))


async def save_template(ctx: Ctx) -> Answer:
    template_id = ctx.request.match_info["template"][:64]
    fields = await form_of(ctx.request)
    try:
        values = template_values(fields)
    except ValidationFailed as exc:
        return _editor(ctx, {**fields, "id": template_id}, 422, exc.errors)
    template = await ctx.request.app[DB].write(
        lambda s: rules.update_template(s, ctx.project_id, template_id, values))
    return Answer(redirect=f"/projects/{ctx.project_id}/templates/{template.id}", flash="Template saved",
                  data=template_json(template))


async def duplicate_template(ctx: Ctx) -> Answer:
    original = await _template(ctx)
    values = {column: getattr(original, column) for column in template_store.COLUMNS}
    values["name"] = f"Copy of {original.name}"[:rules.MAX_NAME]
    copy = await ctx.request.app[DB].write(lambda s: rules.create_template(s, ctx.project_id, values))
    return Answer(redirect=f"/projects/{ctx.project_id}/templates/{copy.id}", flash="Template duplicated",
                  data=template_json(copy), status=201)


async def delete_template(ctx: Ctx) -> Answer:
    template_id = ctx.request.match_info["template"][:64]
    try:
        deleted = await ctx.request.app[DB].write(lambda s: rules.delete_template(s, ctx.project_id, template_id))
    except Conflict as exc:
        template = await _template(ctx)
        answer = _editor(ctx, template_json(template), 409, problem=f"Not deleted: {exc.message}. {exc.suggestion}")
        answer.data["error"] = {"status": 409, "message": exc.message}
        return answer
    return Answer(redirect=f"/projects/{ctx.project_id}/templates", flash=f"Template {deleted.name} deleted",
                  data={"deleted": deleted.id})


async def preview_template(ctx: Ctx) -> Answer:
    """Render the posted fields as they would be mailed; keep them as the user's draft for the frame."""
    request = ctx.request
    fields = await form_of(request)
    live = live_fragment(request)
    fragment = "template_preview.html" if live else "template_preview_page.html"
    try:
        values = template_values({**fields, "name": fields.get("name") or "preview"})
        assert ctx.visit is not None
        fallback = ctx.visit.user.email

        def render(session) -> dict[str, Any]:
            variables = template_preview.sample_variables(session, ctx.project_id, fields.get("sampleEmail", ""),
                                                          fields.get("sampleData", ""), fallback)
            draft_values = {"subject": values["subject"], "body": values["body"], "type": values["type"],
                            "style": values["style"], "variables": variables}
            shown = template_preview.preview(_unsaved(values), _sender(ctx),
                                             request.app[LINKS], variables,
                                             request.app[CONFIG].smtp.max_message_bytes)
            draft = template_store.save_draft(session, ctx.project_id, ctx.user_id, draft_values)
            return {"subject": shown.subject, "html": shown.html, "text": shown.text, "draftId": draft.id}

        shown = await request.app[DB].write(render)
    except (ValidationFailed, NotFound) as exc:
        errors = [e.as_dict() for e in getattr(exc, "errors", [])]
        return Answer(fragment, {"problem": exc.message, "errors": errors, "variables": []},
                      status=200 if live else exc.status)
    variables = template_preview.variables_used(values["subject"], values["body"])
    return Answer(fragment, {**shown, "problem": "", "errors": [],
                             "previewUrl": f"/projects/{ctx.project_id}/templates/preview/{shown['draftId']}",
                             "variables": [vars(v) for v in variables]})


def _sender(ctx: Ctx) -> tuple[str, str]:
    assert ctx.project is not None
    return ctx.project.from_email, ctx.project.from_name


def _unsaved(values: dict[str, Any]) -> Template:
    return Template(**{column: values.get(column) for column in template_store.COLUMNS})


async def preview_document(ctx: Ctx) -> web.StreamResponse:
    """The draft's email as mailed, for the sandboxed frame (never the dashboard's own CSP: the mail's
    inline styles are shown, its scripts never run)."""
    request = ctx.request
    draft = await request.app[DB].read(template_store.get_draft, ctx.project_id, ctx.user_id,
                                       request.match_info["draft"][:64])
    if draft is None:
        return web.Response(status=404, text="This preview was replaced by a newer one.")
    values = {"subject": draft.subject, "body": draft.body, "type": draft.type, "style": draft.style}
    try:
        shown = await request.app[DB].read(lambda s: template_preview.preview(
            _unsaved(values), _sender(ctx), request.app[LINKS], draft.variables,
            request.app[CONFIG].smtp.max_message_bytes))
    except ValidationFailed as exc:
        return web.Response(status=422, text=exc.message)
    if shown.html is not None:
        return web.Response(text=shown.html, content_type="text/html")
    return web.Response(text=shown.text, content_type="text/plain")


async def test_send(ctx: Ctx) -> Answer:
    """A copy of the saved template to the signed-in user, with the sample data of the form."""
    request = ctx.request
    template = await _template(ctx)
    fields = await form_of(request)
    assert ctx.visit is not None and ctx.project is not None
    address = ctx.visit.user.email
    project = ctx.project

    def send(session):
        variables = template_preview.sample_variables(session, ctx.project_id, fields.get("sampleEmail", ""),
                                                      fields.get("sampleData", ""), address)
        return template_preview.send_test_copy(session, project, template, address, request.app[LINKS], variables,
                                               request.app[CONFIG].smtp.max_message_bytes)

    try:
        queued = await request.app[DB].write(send)
    except ValidationFailed as exc:
        answer = _editor(ctx, template_json(template), exc.status, exc.errors,
                         problem=f"Test not sent: {exc.message}")
        answer.data["error"] = {"status": exc.status, "message": exc.message}
        return answer
    for wake in request.app[ON_QUEUED]:
        wake()
    return Answer(redirect=f"/projects/{ctx.project_id}/templates/{template.id}",
                  flash=f"A test copy is on its way to {address}",
                  data={"emails": [{"email": q.email, "id": q.email_id} for q in queued]})


ROUTES = [
    Page("GET", "/projects/{project}/templates", list_templates),
    Page("POST", "/projects/{project}/templates", create_template, role=Role.EDITOR),
    Page("GET", "/projects/{project}/templates/new", new_template, role=Role.EDITOR),
    Page("POST", "/projects/{project}/templates/preview", preview_template),
    Page("GET", "/projects/{project}/templates/preview/{draft}", preview_document, sandboxed=True),
    Page("GET", "/projects/{project}/templates/{template}", show_template),
    Page("POST", "/projects/{project}/templates/{template}", save_template, role=Role.EDITOR),
    Page("POST", "/projects/{project}/templates/{template}/duplicate", duplicate_template, role=Role.EDITOR),
    Page("POST", "/projects/{project}/templates/{template}/delete", delete_template, role=Role.EDITOR),
    Page("POST", "/projects/{project}/templates/{template}/test", test_send, role=Role.EDITOR),
]
