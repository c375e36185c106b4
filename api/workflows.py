"""Workflows (Plunk-next `/workflows`: a trigger event and a list of steps) and legacy actions (seed 002's
`/actions`: trigger events, `notevents`, a delay in minutes, `runOnce`, a template), one engine behind
both: an action is stored as a workflow of kind ACTION whose steps are a delay (when > 0) and a send.

The steps are parsed by the models of `pipeline.workflows.definitions` (`validate_definition`; errors name
the step, e.g. `steps.2.type` unknown_step_type), which also describe them in /openapi.json; what JSON
schema cannot say (step ids that must exist, no cycles, every step reachable, templates of
the project, a delay `until` at most 366 days ahead) is listed in tests/schemathesis.toml.

An action is not a workflow: `/workflows/…` answers 404 for an action's id, and its runs and stats are
read at `/actions/{id}/runs`, `/actions/{id}/runs/{runId}/cancel` and `/actions/{id}/stats`.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from aiohttp import web
from pydantic import ConfigDict, Field, StringConstraints, WithJsonSchema

from api.context import CONFIG, DB
from api.envelope import success
from api.routing import Handler, Route, caller
from api.schemas import Out
from api.serialize import page_json
from api.validation import NO_NUL, PAGE_QUERY, Body, page_params, read_body
from pipeline.workflows import definitions as grammar
from pipeline.workflows import rules as rules
from pipeline.workflows.rules import ACTION, WORKFLOW, ActionFields, WorkflowFields
from storage import workflow_admin as store
from storage.models import Workflow, WorkflowRun

Steps = Annotated[list[Any], grammar.StepList]
EventName = Annotated[str, WithJsonSchema({"type": "string", "minLength": 1, "maxLength": grammar.MAX_EVENT_NAME,
                                           "pattern": grammar.EVENT_NAME_PATTERN})]
TemplateId = Annotated[str, StringConstraints(min_length=1, max_length=grammar.MAX_TEMPLATE_ID, pattern=NO_NUL)]
Name = Annotated[str, StringConstraints(min_length=1, max_length=rules.MAX_NAME)]
Id = Annotated[str, StringConstraints(min_length=1, max_length=64, pattern=NO_NUL)]

# ---------------------------------------------------------------------------------------------------
# Bodies and replies.


class TriggerBody(Body):
    event: EventName


class CreateWorkflowBody(Body):
    name: Name
    trigger: TriggerBody
    steps: Steps
    enabled: bool = True
    allowReentry: bool = Field(default=True, description="false: at most one run per contact, ever")


class UpdateWorkflowBody(Body):
    name: Name | None = None
    trigger: TriggerBody | None = None
    steps: Steps | None = None
    enabled: bool | None = None
    allowReentry: bool | None = None


class TriggerOut(Out):
    event: str


class WorkflowOut(Out):
    id: str
    name: str
    trigger: TriggerOut
    steps: Steps
    enabled: bool
    allowReentry: bool
    projectId: str
    createdAt: datetime
    updatedAt: datetime


class WorkflowPage(Out):
    items: list[WorkflowOut]
    nextCursor: str | None
    hasMore: bool
    total: int = Field(ge=0)


class HistoryEntryOut(Out):
    """One step a run took (written by the engine)."""

    model_config = ConfigDict(extra="allow")
    step: str | None = None
    type: str | None = None
    at: str | None = None
    outcome: Any = None


RunStatus = Literal["ACTIVE", "WAITING", "COMPLETED", "EXITED", "CANCELLED", "FAILED"]


class RunOut(Out):
    id: str
    workflowId: str
    contactId: str
    status: RunStatus
    position: str | None = Field(description="The step the run is at (runs next, or waits in)")
    dueAt: datetime | None
    waitingFor: str | None
    history: list[HistoryEntryOut]
    emailsSent: int = Field(ge=0)
    triggerEventId: str | None
    createdAt: datetime
    updatedAt: datetime


class RunPage(Out):
    items: list[RunOut]
    nextCursor: str | None
    hasMore: bool
    total: int = Field(ge=0)


class WorkflowStats(Out):
    started: int = Field(ge=0)
    active: int = Field(ge=0)
    waiting: int = Field(ge=0)
    completed: int = Field(ge=0)
    exited: int = Field(ge=0)
    cancelled: int = Field(ge=0)
    failed: int = Field(ge=0)
    emailsSent: int = Field(ge=0)


ActionEvents = Annotated[list[EventName], Field(min_length=1, max_length=rules.MAX_ACTION_EVENTS)]
ActionNotEvents = Annotated[list[EventName], Field(max_length=rules.MAX_ACTION_EVENTS)]
Delay = Annotated[int, Field(ge=0, le=grammar.MAX_DELAY_MINUTES, description="Minutes before the send")]


class CreateActionBody(Body):
    name: Name
    events: ActionEvents
    notevents: ActionNotEvents = []
    delay: Delay = 0
    runOnce: bool = False
    template: TemplateId


class UpdateActionBody(Body):
    id: Id
    name: Name | None = None
    events: ActionEvents | None = None
    notevents: ActionNotEvents | None = None
    delay: Delay | None = None
    runOnce: bool | None = None
    template: TemplateId | None = None

    def fields(self) -> ActionFields:
        return ActionFields(self.name, self.events, self.notevents, self.delay, self.runOnce, self.template)


class ActionRefBody(Body):
    id: Id


class ActionOut(Out):
    id: str
    name: str
    events: list[str]
    notevents: list[str]
    delay: int = Field(ge=0)
    runOnce: bool
    template: str | None
    projectId: str
    createdAt: datetime
    updatedAt: datetime


class ActionPage(Out):
    items: list[ActionOut]
    nextCursor: str | None
    hasMore: bool
    total: int = Field(ge=0)


def workflow_json(workflow: Workflow, triggers: list[str]) -> dict[str, Any]:
    return {"id": workflow.id, "name": workflow.name, "trigger": {"event": triggers[0] if triggers else ""},
            "steps": list((workflow.definition or {}).get("steps") or []), "enabled": workflow.enabled,
            "allowReentry": not workflow.run_once, "projectId": workflow.project_id,
            "createdAt": workflow.created_at, "updatedAt": workflow.updated_at}


def action_json(workflow: Workflow, triggers: list[str]) -> dict[str, Any]:
    delay, template = grammar.action_fields(workflow.definition)
    return {"id": workflow.id, "name": workflow.name, "events": triggers,
            "notevents": list(workflow.exclude_events or []), "delay": delay, "runOnce": workflow.run_once,
            "template": template, "projectId": workflow.project_id, "createdAt": workflow.created_at,
            "updatedAt": workflow.updated_at}


def run_json(run: WorkflowRun) -> dict[str, Any]:
    return {"id": run.id, "workflowId": run.workflow_id, "contactId": run.contact_id, "status": run.status,
            "position": run.step_id, "dueAt": run.due_at, "waitingFor": run.waiting_for,
            "history": list(run.history or []), "emailsSent": run.emails_sent or 0,
            "triggerEventId": run.trigger_event_id, "createdAt": run.created_at, "updatedAt": run.updated_at}


def _shaped(session, workflow: Workflow) -> dict[str, Any]:
    triggers = store.triggers_of(session, [workflow.id])[workflow.id]
    return (action_json if workflow.kind == ACTION else workflow_json)(workflow, triggers)


# ---------------------------------------------------------------------------------------------------
# Handlers: workflows.

async def _list(request: web.Request, kind: str) -> web.Response:
    limit, cursor = page_params(request)
    project_id = caller(request).project_id
    shape = action_json if kind == ACTION else workflow_json

    def query(session) -> dict[str, Any]:
        page = store.list_workflows(session, project_id, kind, limit, cursor)
        triggers = store.triggers_of(session, [w.id for w in page.items])
        return page_json(page, lambda w: shape(w, triggers[w.id]))

    return success(await request.app[DB].read(query))


async def list_workflows(request: web.Request) -> web.Response:
    return await _list(request, WORKFLOW)


async def create_workflow(request: web.Request) -> web.Response:
    body = await read_body(request, CreateWorkflowBody)
    fields = WorkflowFields(body.name, body.trigger.event, body.steps, body.enabled, body.allowReentry)
    await grammar.check_webhook_targets(body.steps, request.app[CONFIG].webhooks.allow_private_targets)
    project_id, max_bytes = caller(request).project_id, request.app[CONFIG].smtp.max_message_bytes
    workflow = await request.app[DB].write(
        lambda s: _shaped(s, rules.create_workflow(s, project_id, fields, max_bytes)))
    return success(workflow)


async def _get(request: web.Request, kind: str, workflow_id: str) -> web.Response:
    project_id = caller(request).project_id
    return success(await request.app[DB].read(
        lambda s: _shaped(s, rules.require_workflow(s, project_id, workflow_id, kind))))


async def get_workflow(request: web.Request) -> web.Response:
    return await _get(request, WORKFLOW, request.match_info["id"])


async def update_workflow(request: web.Request) -> web.Response:
    body = await read_body(request, UpdateWorkflowBody)
    fields = WorkflowFields(body.name, body.trigger.event if body.trigger else None, body.steps, body.enabled,
                            body.allowReentry)
    await grammar.check_webhook_targets(body.steps, request.app[CONFIG].webhooks.allow_private_targets)
    project_id, workflow_id = caller(request).project_id, request.match_info["id"]
    max_bytes = request.app[CONFIG].smtp.max_message_bytes
    workflow = await request.app[DB].write(
        lambda s: _shaped(s, rules.update_workflow(s, project_id, workflow_id, fields, max_bytes)))
    return success(workflow)


async def _delete(request: web.Request, kind: str, workflow_id: str) -> web.Response:
    project_id = caller(request).project_id
    await rules.delete_runs(request.app[DB], project_id, workflow_id, kind)

    def delete(session) -> dict[str, Any]:
        workflow = rules.require_workflow(session, project_id, workflow_id, kind)
        shaped = _shaped(session, workflow)
        rules.delete_workflow(session, project_id, workflow_id, kind)
        return shaped

    return success(await request.app[DB].write(delete))


async def delete_workflow(request: web.Request) -> web.Response:
    return await _delete(request, WORKFLOW, request.match_info["id"])


def runs_handlers(kind: str) -> tuple[Handler, Handler, Handler]:
    """The runs list, run cancel and stats handlers of one kind (workflows or actions), each answering 404
    for an id of the other kind."""

    async def list_runs(request: web.Request) -> web.Response:
        limit, cursor = page_params(request)
        project_id, workflow_id = caller(request).project_id, request.match_info["id"]

        def query(session) -> dict[str, Any]:
            workflow = rules.require_workflow(session, project_id, workflow_id, kind)
            return page_json(store.list_runs(session, workflow.id, limit, cursor), run_json)

        return success(await request.app[DB].read(query))

    async def cancel_run(request: web.Request) -> web.Response:
        project_id = caller(request).project_id
        workflow_id, run_id = request.match_info["id"], request.match_info["runId"]
        run = await request.app[DB].write(
            lambda s: run_json(rules.cancel_run(s, project_id, workflow_id, run_id, kind)))
        return success(run)

    async def stats(request: web.Request) -> web.Response:
        project_id, workflow_id = caller(request).project_id, request.match_info["id"]

        def query(session) -> dict[str, int]:
            workflow = rules.require_workflow(session, project_id, workflow_id, kind)
            return store.run_stats(session, workflow.id)

        return success(await request.app[DB].read(query))

    return list_runs, cancel_run, stats


list_runs, cancel_run, workflow_stats = runs_handlers(WORKFLOW)
list_action_runs, cancel_action_run, action_stats = runs_handlers(ACTION)


# ---------------------------------------------------------------------------------------------------
# Handlers: legacy actions.

async def list_actions(request: web.Request) -> web.Response:
    return await _list(request, ACTION)


async def create_action(request: web.Request) -> web.Response:
    body = await read_body(request, CreateActionBody)
    fields = ActionFields(body.name, body.events, body.notevents, body.delay, body.runOnce, body.template)
    project_id = caller(request).project_id
    action = await request.app[DB].write(lambda s: _shaped(s, rules.create_action(s, project_id, fields)))
    return success(action)


async def put_action(request: web.Request) -> web.Response:
    body = await read_body(request, UpdateActionBody)
    project_id = caller(request).project_id
    action = await request.app[DB].write(
        lambda s: _shaped(s, rules.update_action(s, project_id, body.id, body.fields())))
    return success(action)


async def get_action(request: web.Request) -> web.Response:
    return await _get(request, ACTION, request.match_info["id"])


async def delete_action_by_body(request: web.Request) -> web.Response:
    return await _delete(request, ACTION, (await read_body(request, ActionRefBody)).id)


async def delete_action_by_path(request: web.Request) -> web.Response:
    return await _delete(request, ACTION, request.match_info["id"])


TAG = "Workflows"
ACTIONS = "Actions"
ROUTES = [
    Route("GET", "/workflows", list_workflows, "List workflows, newest first", query=PAGE_QUERY, tag=TAG,
          response=WorkflowPage, legacy="items"),
    Route("POST", "/workflows", create_workflow, "Create a workflow: a trigger event and its steps",
          body=CreateWorkflowBody, tag=TAG, status=201, response=WorkflowOut),
    Route("GET", "/workflows/{id}", get_workflow, "Get a workflow", tag=TAG, response=WorkflowOut),
    Route("PATCH", "/workflows/{id}", update_workflow, "Update a workflow (steps: not while a live run sits on a "
          "step the change drops)", body=UpdateWorkflowBody, tag=TAG, response=WorkflowOut,
          errors=frozenset({409})),
    Route("DELETE", "/workflows/{id}", delete_workflow, "Delete a workflow and all its runs", tag=TAG,
          response=WorkflowOut),
    Route("GET", "/workflows/{id}/runs", list_runs, "A workflow's runs, newest first",
          query=PAGE_QUERY, tag=TAG, response=RunPage, legacy="items"),
    Route("POST", "/workflows/{id}/runs/{runId}/cancel", cancel_run, "Cancel an active or waiting run", tag=TAG,
          response=RunOut, errors=frozenset({409})),
    Route("GET", "/workflows/{id}/stats", workflow_stats, "A workflow's runs by state and the emails they sent",
          tag=TAG, response=WorkflowStats),
    Route("GET", "/actions", list_actions, "List actions (legacy automations), newest first", query=PAGE_QUERY,
          tag=ACTIONS, response=ActionPage, legacy="items"),
    Route("POST", "/actions", create_action, "Create an action: trigger events, excluding events, a delay and a "
          "template", body=CreateActionBody, tag=ACTIONS, status=201, response=ActionOut),
    Route("PUT", "/actions", put_action, "Update an action (id in the body)", body=UpdateActionBody, tag=ACTIONS,
          response=ActionOut, errors=frozenset({404, 409})),
    Route("DELETE", "/actions", delete_action_by_body, "Delete an action and its runs (id in the body)",
          body=ActionRefBody, tag=ACTIONS, response=ActionOut, errors=frozenset({404})),
    Route("GET", "/actions/{id}", get_action, "Get an action", tag=ACTIONS, response=ActionOut),
    Route("DELETE", "/actions/{id}", delete_action_by_path, "Delete an action and its runs", tag=ACTIONS,
          response=ActionOut),
    Route("GET", "/actions/{id}/runs", list_action_runs, "An action's runs, newest first", query=PAGE_QUERY,
          tag=ACTIONS, response=RunPage, legacy="items"),
    Route("POST", "/actions/{id}/runs/{runId}/cancel", cancel_action_run, "Cancel an action's active or waiting run",
          tag=ACTIONS, response=RunOut, errors=frozenset({409})),
    Route("GET", "/actions/{id}/stats", action_stats, "An action's runs by state and the emails they sent",
          tag=ACTIONS, response=WorkflowStats),
]
