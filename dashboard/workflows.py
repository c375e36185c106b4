"""Workflow pages: the list (workflows and legacy actions, enabled state, run counts), a workflow drawn as a
graph of its steps with how many runs wait at, passed and failed at each, its definition edited as JSON
(the grammar's errors shown at the step they name), enable/disable, and its runs with position and history.

Rules and the grammar are `pipeline.workflows`; the per-step counts are one statement while no run changed
(`pipeline.workflows.rules.workflow_counts`).
"""

from __future__ import annotations

import json
import re
from contextlib import suppress
from typing import Any

from dashboard.context import CONFIG, DB
from dashboard.routing import Answer, Ctx, Page, form_of, wants_json
from pipeline.errors import FieldError, ValidationFailed
from pipeline.workflows import definitions as grammar
from pipeline.workflows import rules
from pipeline.workflows.rules import ACTION, WORKFLOW, WorkflowFields
from storage import templates as template_store
from storage import workflow_admin as store
from storage.models import Role, Workflow
from storage.pagination import is_valid_cursor

PAGE_SIZE = 50
RUNS_PAGE_SIZE = 20
"""Runs shown per page on a workflow's page: each draws its history, the page's costliest part."""
MAX_STEPS_TEXT = grammar.MAX_DEFINITION_BYTES + 64 * 1024
"""The definition's textarea: the grammar's bound on the steps, and room for the indentation."""
MAX_NAMED = 1000
"""Templates of send steps whose names the graph shows (the rest by id)."""
STEP_PATH = re.compile(r"steps\.(\d+)(?:\.|$)")


def _cursor(ctx: Ctx) -> str | None:
    cursor = ctx.request.query.get("cursor")
    if cursor is not None and not is_valid_cursor(cursor):
        raise ValidationFailed([FieldError("cursor", "Not a cursor this page gave", "invalid_string")])
    return cursor


def _workflow_id(ctx: Ctx) -> str:
    return ctx.request.match_info["workflow"][:64]


def _summary(workflow: Workflow, triggers: list[str], runs: dict[str, int]) -> dict[str, Any]:
    delay, template = grammar.action_fields(workflow.definition) if workflow.kind == ACTION else (None, None)
    return {"id": workflow.id, "name": workflow.name, "kind": workflow.kind, "enabled": workflow.enabled,
            "triggers": triggers, "notevents": list(workflow.exclude_events or []),
            "allowReentry": not workflow.run_once, "delay": delay, "template": template,
            "steps": len((workflow.definition or {}).get("steps") or []), "liveRuns": runs["live"],
            "runs": runs["total"], "createdAt": workflow.created_at, "updatedAt": workflow.updated_at}


async def workflow_list(ctx: Ctx) -> Answer:
    cursor = _cursor(ctx)

    def read(session) -> dict[str, Any]:
        workflows = store.list_workflows(session, ctx.project_id, WORKFLOW, PAGE_SIZE, cursor)
        actions = store.list_workflows(session, ctx.project_id, ACTION, PAGE_SIZE, None) if cursor is None else None
        shown = workflows.items + (actions.items if actions else [])
        ids = [w.id for w in shown]
        triggers, runs = store.triggers_of(session, ids), store.run_counts(session, ids)
        return {"workflows": [_summary(w, triggers[w.id], runs[w.id]) for w in workflows.items],
                "actions": [_summary(w, triggers[w.id], runs[w.id]) for w in actions.items] if actions else [],
                "nextCursor": workflows.next_cursor}

    return Answer("workflows.html", await ctx.request.app[DB].read(read))


def _run_json(row: Any) -> dict[str, Any]:
    return {"id": row.id, "contactId": row.contact_id, "contactEmail": row.email, "status": row.status,
            "position": row.step_id, "dueAt": row.due_at, "waitingFor": row.waiting_for,
            "history": list(row.history or []), "emailsSent": row.emails_sent or 0, "createdAt": row.created_at,
            "updatedAt": row.updated_at}


async def _page_data(ctx: Ctx, workflow_id: str) -> dict[str, Any]:
    cursor = _cursor(ctx)

    def read(session) -> dict[str, Any]:
        workflow = rules.require_workflow(session, ctx.project_id, workflow_id)
        triggers = store.triggers_of(session, [workflow.id])[workflow.id]
        steps = list((workflow.definition or {}).get("steps") or [])
        counted = rules.workflow_counts(session, workflow.id)
        runs, counts = counted.runs, counted.steps
        page = store.run_page(session, workflow.id, RUNS_PAGE_SIZE, cursor)
        sent = [step["template"] for step in steps if isinstance(step, dict) and isinstance(step.get("template"), str)]
        return {"workflow": _summary(workflow, triggers, runs), "definition": steps,
                "templateNames": template_store.template_names(session, ctx.project_id, sent[:MAX_NAMED]),
                "stepCounts": {step["id"]: counts.get(step["id"], {"waiting": 0, "passed": 0, "failed": 0})
                               for step in steps if isinstance(step, dict) and isinstance(step.get("id"), str)},
                "runs": [_run_json(row) for row in page.items], "nextCursor": page.next_cursor}

    return await ctx.request.app[DB].read(read)


def _answer(data: dict[str, Any], values: dict[str, str] | None = None, errors: list[dict[str, str]] | None = None,
            status: int = 200, message: str | None = None) -> Answer:
    workflow, steps = data["workflow"], data["definition"]
    values = values or {"name": workflow["name"], "trigger": (workflow["triggers"] or [""])[0],
                        "steps": json.dumps(steps, indent=2, ensure_ascii=False)}
    errors = errors or []
    drawn = steps
    if errors and values.get("steps"):
        with suppress(ValidationFailed):
            drawn = _steps_given(values["steps"])
    drawing = graph(drawn, data["stepCounts"], data["templateNames"])
    return Answer("workflow.html", {**data, "values": values, "errors": errors, "message": message},
                  status=status, extra={"graph": drawing, "unsaved": drawn is not steps,
                                        "stepErrors": errors_by_step(errors)})


async def workflow_page(ctx: Ctx) -> Answer:
    return _answer(await _page_data(ctx, _workflow_id(ctx)))


def _steps_given(text: str) -> list[Any]:
    """The steps from the textarea: a JSON list of steps, or an object with `steps`."""
    if len(text) > MAX_STEPS_TEXT:
        raise ValidationFailed([FieldError("steps", f"At most {MAX_STEPS_TEXT} characters", "too_big")])
    try:
        given = json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise ValidationFailed([FieldError("steps", f"Not valid JSON: {str(exc)[:200]}", "invalid_json")]) from None
    steps = given.get("steps") if isinstance(given, dict) else given
    if not isinstance(steps, list):
        raise ValidationFailed([FieldError("steps", "A JSON list of steps (or an object with steps)",
                                           "invalid_type")])
    return steps


async def _workflow_fields(ctx: Ctx, fields: dict[str, str]) -> WorkflowFields:
    """Name, trigger and steps from the form, bounded; webhook steps' targets checked (outside a transaction)."""
    name = fields.get("name", "").strip()
    if not 1 <= len(name) <= rules.MAX_NAME or "\x00" in name:
        raise ValidationFailed([FieldError("name", f"1 to {rules.MAX_NAME} characters", "invalid_string")])
    trigger = fields.get("trigger", "").strip()[:grammar.MAX_EVENT_NAME + 1]
    steps = _steps_given(fields.get("steps", ""))
    await grammar.check_webhook_targets(steps, ctx.request.app[CONFIG].webhooks.allow_private_targets)
    enabled = fields["enabled"] == "true" if "enabled" in fields else None
    return WorkflowFields(name=name, trigger=trigger, steps=steps, enabled=enabled)


async def _first_template(ctx: Ctx) -> str:
    page = await ctx.request.app[DB].read(template_store.list_templates, ctx.project_id, 1, None)
    return page.items[0].id if page.items else "TEMPLATE-ID"


async def new_workflow_form(ctx: Ctx) -> Answer:
    """A starting point: an event, a delay, a send of the newest template."""
    example = [{"id": "wait", "type": "delay", "minutes": 10, "next": "mail"},
               {"id": "mail", "type": "send", "template": await _first_template(ctx)}]
    return Answer("workflow_new.html", {"values": {"name": "", "trigger": "", "enabled": "true",
                                                   "steps": json.dumps(example, indent=2)}, "errors": []})


async def create_workflow(ctx: Ctx) -> Answer:
    fields = await form_of(ctx.request)
    app = ctx.request.app
    try:
        values = await _workflow_fields(ctx, fields)
        max_bytes = app[CONFIG].smtp.max_message_bytes
        workflow_id = await app[DB].write(lambda s: rules.create_workflow(s, ctx.project_id, values, max_bytes).id)
    except ValidationFailed as exc:
        if wants_json(ctx.request):
            raise
        return Answer("workflow_new.html", {"values": fields, "errors": [e.as_dict() for e in exc.errors],
                                            "message": exc.message}, status=422)
    return Answer(redirect=f"/projects/{ctx.project_id}/workflows/{workflow_id}", flash="Workflow created",
                  data={"id": workflow_id}, status=201)


async def edit_workflow(ctx: Ctx) -> Answer:
    workflow_id = _workflow_id(ctx)
    fields = await form_of(ctx.request)
    app = ctx.request.app
    try:
        changes = await _workflow_fields(ctx, fields)
        steps = changes.steps or []
        max_bytes = app[CONFIG].smtp.max_message_bytes
        await app[DB].write(lambda s: rules.update_workflow(s, ctx.project_id, workflow_id, changes, max_bytes))
    except ValidationFailed as exc:
        if wants_json(ctx.request):
            raise
        return _answer(await _page_data(ctx, workflow_id), fields, [e.as_dict() for e in exc.errors], 422,
                       exc.message)
    return Answer(redirect=f"/projects/{ctx.project_id}/workflows/{workflow_id}", flash="Workflow saved",
                  data={"id": workflow_id, "steps": len(steps)})


async def set_enabled(ctx: Ctx) -> Answer:
    workflow_id = _workflow_id(ctx)
    fields = await form_of(ctx.request)
    if fields.get("enabled") not in ("true", "false"):
        raise ValidationFailed([FieldError("enabled", "true or false", "invalid_type")])
    enabled = fields["enabled"] == "true"
    await ctx.request.app[DB].write(lambda s: rules.update_workflow(s, ctx.project_id, workflow_id,
                                                                    WorkflowFields(enabled=enabled)))
    return Answer(redirect=f"/projects/{ctx.project_id}/workflows/{workflow_id}",
                  flash="Workflow enabled" if enabled else "Workflow disabled",
                  data={"id": workflow_id, "enabled": enabled})


def errors_by_step(errors: list[dict[str, str]]) -> dict[int, list[str]]:
    """The errors that name a step (`steps.N…`), by N; the rest are shown with the form."""
    found: dict[int, list[str]] = {}
    for error in errors:
        match = STEP_PATH.match(error.get("field", ""))
        if match:
            found.setdefault(int(match.group(1)), []).append(f"{error['field']}: {error['message']}")
    return found


# ---------------------------------------------------------------------------------------------------
# The graph: boxes in layers (a step sits one layer below the deepest step that leads to it), arrows
# labelled with their branch. Geometry only; the template draws it as SVG.

BOX_W, BOX_H, GAP_X, GAP_Y, MARGIN, LANE_GAP = 220, 70, 40, 70, 20, 48


def _describe(step: dict[str, Any], template_names: dict[str, str]) -> str:
    kind = step.get("type")
    if kind == "send":
        template = str(step.get("template", ""))
        return f"send {template_names[template]}" if template in template_names else f"send template {template}"
    if kind == "delay":
        for unit in ("seconds", "minutes", "until"):
            if unit in step:
                return f"delay {step[unit]} {unit}" if unit != "until" else f"delay until {step[unit]}"
    if kind == "wait":
        return f"wait for {step.get('event', '')}, {step.get('timeoutSeconds', '')} s"
    if kind == "webhook":
        return f"webhook {step.get('url', '')}"
    return str(kind)


def _short(text: str, limit: int = 30) -> str:
    return text if len(text) <= limit else text[:limit - 1] + "…"


def graph(given: list[Any], counts: dict[str, dict[str, int]], template_names: dict[str, str] | None = None
          ) -> dict[str, Any]:
    """`given` may be a definition that failed validation: what is not a step with an id is left out, and
    each box keeps its step's index in `given` (`index`), which the errors name. A send step shows its
    template's name when `template_names` has it."""
    kept = [(index, step) for index, step in enumerate(given)
            if isinstance(step, dict) and isinstance(step.get("id"), str)]
    steps = [step for _, step in kept]
    index_of = {step["id"]: index for index, step in enumerate(steps)}
    edges = [(index, branch, index_of[step[branch]]) for index, step in enumerate(steps)
             for branch in grammar.BRANCHES.get(str(step.get("type")), ()) if step.get(branch) in index_of]
    layer = [0] * len(steps)
    for _ in range(len(steps)):  # longest path from the entry; a stored definition has no cycles
        changed = False
        for source, _branch, target in edges:
            if target != 0 and layer[target] < layer[source] + 1:
                layer[target], changed = layer[source] + 1, True
        if not changed:
            break
    rows: dict[int, list[int]] = {}
    for index in range(len(steps)):
        rows.setdefault(layer[index], []).append(index)
    widest = max((len(row) for row in rows.values()), default=1)
    width = MARGIN * 2 + widest * BOX_W + (widest - 1) * GAP_X
    boxes = []
    position: dict[int, tuple[float, float]] = {}
    for depth, members in rows.items():
        row_width = len(members) * BOX_W + (len(members) - 1) * GAP_X
        for slot, index in enumerate(members):
            x = (width - row_width) / 2 + slot * (BOX_W + GAP_X)
            y = MARGIN + depth * (BOX_H + GAP_Y)
            position[index] = (x, y)
            step = steps[index]
            count = counts.get(step["id"], {"waiting": 0, "passed": 0, "failed": 0})
            detail = _short(_describe(step, template_names or {}))
            boxes.append({"id": step["id"], "index": kept[index][0], "x": x, "y": y, "type": step.get("type"),
                          "label": _short(step["id"]), "detail": detail, **count})
    long_edges = [edge for edge in edges if layer[edge[2]] > layer[edge[0]] + 1]
    lane_x = width + LANE_GAP / 2
    width += LANE_GAP * len(long_edges) + (LANE_GAP if long_edges else 0)
    arrows = []
    for source, branch, target in edges:
        (sx, sy), (tx, ty) = position[source], position[target]
        x1, y1, x2, y2 = sx + BOX_W / 2, sy + BOX_H, tx + BOX_W / 2, ty - 4
        if (source, branch, target) in long_edges:
            # Past the layers between: down, out to a lane right of every box, down, back, into the target.
            lane = lane_x + LANE_GAP * long_edges.index((source, branch, target))
            above = ty - GAP_Y / 2
            d = (f"M{x1},{y1} V{y1 + GAP_Y / 2} H{lane} V{above} H{x2} V{y2}")
            lx, ly = lane + 4, (y1 + above) / 2
        else:
            d = f"M{x1},{y1} L{x2},{y2}"
            lx, ly = (x1 + x2) / 2 + 6, (y1 + y2) / 2
        arrows.append({"from": steps[source]["id"], "to": steps[target]["id"], "branch": branch, "d": d,
                       "lx": lx, "ly": ly})
    height = MARGIN * 2 + (max(rows, default=0) + 1) * BOX_H + max(rows, default=0) * GAP_Y
    return {"width": width, "height": height, "boxes": boxes, "arrows": arrows, "w": BOX_W, "h": BOX_H}


ROUTES = [
    Page("GET", "/projects/{project}/workflows", workflow_list),
    Page("GET", "/projects/{project}/workflows/new", new_workflow_form, role=Role.EDITOR),
    Page("POST", "/projects/{project}/workflows", create_workflow, role=Role.EDITOR),
    Page("GET", "/projects/{project}/workflows/{workflow}", workflow_page),
    Page("POST", "/projects/{project}/workflows/{workflow}/edit", edit_workflow, role=Role.EDITOR),
    Page("POST", "/projects/{project}/workflows/{workflow}/enabled", set_enabled, role=Role.EDITOR),
]
