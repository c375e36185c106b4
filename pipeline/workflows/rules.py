"""Workflow rules for the API: create, update, enable/disable and delete workflows (and legacy actions,
stored as workflows of kind ACTION), list and cancel runs, and the "in use" checks that keep a
template or an event name a workflow depends on from being deleted.

Changing the steps of a workflow that has live runs (ACTIVE or WAITING) is allowed only when every
step a live run sits on is still there, with the same id and the same type: the runs then go on from
there in the new definition. Otherwise 409 naming the steps (cancel those runs, or keep the steps).
Deleting a workflow deletes all its runs with it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sqlalchemy.orm import Session

from pipeline.cache import TtlCache
from pipeline.errors import Conflict, FieldError, NotFound, ValidationFailed
from pipeline.workflows.definitions import (
    ACTION_DELAY_STEP,
    ACTION_SEND_STEP,
    action_definition,
    action_fields,
    events_used,
    validate_definition,
)
from storage import workflow_admin as store
from storage.db import Database
from storage.models import Workflow, WorkflowRun, utcnow
from storage.workflow_admin import LIVE_STATUSES, WorkflowRef

WORKFLOW = "WORKFLOW"
ACTION = "ACTION"
MAX_NAME = 200
MAX_EVENT_NAME = 200
MAX_ACTION_EVENTS = 50
_NAMED = 5


@dataclass
class WorkflowFields:
    """A Plunk-next workflow as given; None: not given (an update keeps the stored value)."""

    name: str | None = None
    trigger: str | None = None
    steps: list[Any] | None = None
    enabled: bool | None = None
    allow_reentry: bool | None = None


@dataclass
class ActionFields:
    """A legacy action (seed 002) as given; None: not given."""

    name: str | None = None
    events: list[str] | None = None
    notevents: list[str] | None = None
    delay: int | None = None
    run_once: bool | None = None
    template: str | None = None


def _kind_word(kind: str) -> str:
    return "Action" if kind == ACTION else "Workflow"


def require_workflow(session: Session, project_id: str, workflow_id: str, kind: str | None = None,
                     for_update: bool = False) -> Workflow:
    """The project's workflow (of `kind`, when given), or 404."""
    workflow = store.get_workflow(session, project_id, workflow_id, kind, for_update)
    if workflow is None:
        raise NotFound(f"{_kind_word(kind or WORKFLOW)} {workflow_id} not found",
                       "Check the id; it must belong to this project.")
    return workflow


def _check_events(names: list[str], field: str) -> list[FieldError]:
    errors = []
    for index, name in enumerate(names):
        path = f"{field}.{index}" if field != "trigger.event" else field
        if not isinstance(name, str) or not name.strip():
            errors.append(FieldError(path, "Event names are not blank", "too_small"))
        elif len(name) > MAX_EVENT_NAME:
            errors.append(FieldError(path, f"At most {MAX_EVENT_NAME} characters", "too_big"))
    return errors


def _raise(errors: list[FieldError]) -> None:
    if errors:
        raise ValidationFailed(errors)


# ---------------------------------------------------------------------------------------------------
# Plunk-next workflows.

def create_workflow(session: Session, project_id: str, fields: WorkflowFields,
                    max_bytes: int | None = None) -> Workflow:
    """`max_bytes`: see `validate_definition`."""
    if fields.name is None or fields.trigger is None or fields.steps is None:
        raise ValueError("name, trigger and steps are required")
    _raise(_check_events([fields.trigger], "trigger.event"))
    definition = {"steps": fields.steps}
    validate_definition(session, project_id, definition, max_bytes=max_bytes)
    values = {"name": fields.name, "definition": definition, "kind": WORKFLOW, "exclude_events": [],
              "enabled": True if fields.enabled is None else fields.enabled,
              "run_once": fields.allow_reentry is False}
    return store.insert_workflow(session, project_id, values, [fields.trigger])


def update_workflow(session: Session, project_id: str, workflow_id: str, fields: WorkflowFields,
                    max_bytes: int | None = None) -> Workflow:
    workflow = require_workflow(session, project_id, workflow_id, WORKFLOW, for_update=True)
    values: dict[str, Any] = {}
    if fields.trigger is not None:
        _raise(_check_events([fields.trigger], "trigger.event"))
    if fields.steps is not None:
        definition = {"steps": fields.steps}
        validate_definition(session, project_id, definition, max_bytes=max_bytes)
        _check_live_runs(session, workflow, definition)
        values["definition"] = definition
    if fields.name is not None:
        values["name"] = fields.name
    if fields.enabled is not None:
        values["enabled"] = fields.enabled
    if fields.allow_reentry is not None:
        values["run_once"] = not fields.allow_reentry
    if fields.trigger is not None:
        store.set_triggers(session, workflow, [fields.trigger])
    return store.update_workflow(session, workflow, values)


def _check_live_runs(session: Session, workflow: Workflow, definition: dict[str, Any]) -> None:
    """Conflict when a live run sits on a step the new definition drops or changes the type of."""
    positions = store.live_positions(session, workflow.id)
    if not positions:
        return
    old = _step_types(workflow.definition)
    new = _step_types(definition)
    missing = sorted(step for step in positions if step not in new or new[step] != old.get(step))
    if missing:
        shown = ", ".join(f"'{step}'" for step in missing[:_NAMED]) + (
            f" and {len(missing) - _NAMED} more" if len(missing) > _NAMED else "")
        raise Conflict(f"Runs of workflow {workflow.id} are at step {shown}, which the new steps drop or change "
                       "the type of", "Keep those steps (same id and type) until the runs have moved on, or "
                                      "cancel the runs (POST /workflows/:id/runs/:runId/cancel).")


def _step_types(definition: Any) -> dict[str, str | None]:
    steps = definition.get("steps") if isinstance(definition, dict) else None
    return {step["id"]: step.get("type") for step in steps or [] if isinstance(step, dict) and "id" in step}


def delete_workflow(session: Session, project_id: str, workflow_id: str, kind: str = WORKFLOW) -> Workflow:
    """Delete the workflow with all its runs (live ones stop: nothing more is sent for them)."""
    workflow = require_workflow(session, project_id, workflow_id, kind, for_update=True)
    store.delete_workflow(session, workflow)
    return workflow


async def delete_runs(db: Database, project_id: str, workflow_id: str, kind: str = WORKFLOW) -> int:
    """Before `delete_workflow`: its runs, a thousand per transaction, the workflow looked up again in each (404
    for another project's, or one of the other kind). In the DELETE's own transaction, 100,000 runs held every
    other write on SQLite's one writer until it committed. Runs started meanwhile go with the workflow."""
    def part(session: Session, limit: int) -> int:
        workflow = require_workflow(session, project_id, workflow_id, kind)
        return store.delete_runs(session, workflow.id, limit)

    return await db.write_in_chunks(part)


# ---------------------------------------------------------------------------------------------------
# Legacy actions.

def _check_action(session: Session, project_id: str, fields: ActionFields) -> None:
    errors: list[FieldError] = []
    if fields.events is not None:
        if not fields.events:
            errors.append(FieldError("events", "An action needs at least one trigger event", "too_small"))
        errors += _check_events(fields.events, "events")
    if fields.notevents is not None:
        errors += _check_events(fields.notevents, "notevents")
    if fields.template is not None and not store.existing_templates(session, project_id, [fields.template]):
        errors.append(FieldError("template", f"Template {fields.template} not found", "unknown_template"))
    _raise(errors)


def create_action(session: Session, project_id: str, fields: ActionFields) -> Workflow:
    if fields.name is None or fields.events is None or fields.template is None:
        raise ValueError("name, events and template are required")
    _check_action(session, project_id, fields)
    values = {"name": fields.name, "kind": ACTION, "enabled": True,
              "exclude_events": list(dict.fromkeys(fields.notevents or [])),
              "run_once": bool(fields.run_once),
              "definition": action_definition(fields.delay or 0, fields.template)}
    return store.insert_workflow(session, project_id, values, fields.events)


def update_action(session: Session, project_id: str, action_id: str, fields: ActionFields) -> Workflow:
    """Replace the given fields; the others keep their stored values."""
    workflow = require_workflow(session, project_id, action_id, ACTION, for_update=True)
    _check_action(session, project_id, fields)
    current = action_fields(workflow.definition)
    values: dict[str, Any] = {}
    if fields.name is not None:
        values["name"] = fields.name
    if fields.notevents is not None:
        values["exclude_events"] = list(dict.fromkeys(fields.notevents))
    if fields.run_once is not None:
        values["run_once"] = fields.run_once
    if fields.delay is not None or fields.template is not None:
        delay = fields.delay if fields.delay is not None else current[0]
        template = fields.template if fields.template is not None else current[1]
        definition = action_definition(delay, template or "")
        if delay == 0 < current[0]:
            # Plunk's actions have no runs to conflict with: the emails already delayed go when planned.
            store.move_delayed_runs(session, workflow.id, ACTION_DELAY_STEP, ACTION_SEND_STEP, utcnow())
        _check_live_runs(session, workflow, definition)
        values["definition"] = definition
    if fields.events is not None:
        store.set_triggers(session, workflow, fields.events)
    return store.update_workflow(session, workflow, values)


# ---------------------------------------------------------------------------------------------------
# Runs.

def cancel_run(session: Session, project_id: str, workflow_id: str, run_id: str, kind: str) -> WorkflowRun:
    """ACTIVE or WAITING → CANCELLED; a run that has ended is a Conflict."""
    workflow = require_workflow(session, project_id, workflow_id, kind)
    run = store.get_run(session, workflow.id, run_id, for_update=True)
    if run is None:
        raise NotFound(f"Run {run_id} of workflow {workflow_id} not found")
    if run.status not in LIVE_STATUSES:
        raise Conflict(f"Run {run_id} is {run.status} and can no longer be cancelled")
    return store.cancel_run(session, run, utcnow(), _step_types(workflow.definition).get(run.step_id or ""))


# ---------------------------------------------------------------------------------------------------
# What keeps a template or an event name from being deleted.

def describe(refs: list[WorkflowRef]) -> str:
    named = ", ".join(f"{'action' if ref.kind == ACTION else 'workflow'} '{ref.name}' ({ref.id})"
                      for ref in refs[:_NAMED])
    return named + (f" and {len(refs) - _NAMED} more" if len(refs) > _NAMED else "")


def check_event_unused(session: Session, project_id: str, name: str) -> None:
    """Conflict when a workflow or action uses the event name: as its trigger, an excluding event,
    a wait step's event or an event its conditions test."""
    refs = store.event_workflows(session, project_id, name, events_used)
    if refs:
        raise Conflict(f"Events named '{name}' are used by {describe(refs)}",
                       "Change or delete those workflows first.")


_PASSED: TtlCache[tuple[str, int, Any], dict[str, int]] = TtlCache(3600, 1000)
"""(workflow, its runs, their last change) -> runs that passed each step."""


@dataclass(frozen=True)
class WorkflowCounts:
    steps: dict[str, dict[str, int]]
    """Per step id: runs `waiting` there, `failed` there, and how often runs `passed` it."""
    runs: dict[str, int]
    """The workflow's runs: `live` (ACTIVE or WAITING) and `total`."""


def workflow_counts(session: Session, workflow_id: str) -> WorkflowCounts:
    """The workflow page's counts, its runs per step and in all. The passed counts read every run's history
    (100 ms per 2,000 runs on SQLite) and change only when a run does (a run moved, started or cancelled
    changes its updated_at, one deleted the count), so they are kept until then: one statement per call
    while no run changed, two when one did."""
    positions = store.step_positions(session, workflow_id)
    key = (workflow_id, positions.runs, positions.last_change)
    passed = _PASSED.get(key)
    if passed is None:
        passed = store.steps_passed(session, workflow_id)
        _PASSED.put(key, passed)
    counts = positions.counts
    for step_id, count in passed.items():
        counts.setdefault(step_id, {"waiting": 0, "passed": 0, "failed": 0})["passed"] += count
    return WorkflowCounts(counts, {"live": positions.live, "total": positions.runs})
