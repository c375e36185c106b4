"""Workflow queries of the API side: the rows of `workflows` and their triggers as the API writes them,
listing and cancelling runs, per-workflow stats, and what a workflow refers to (templates, event
names) for the "in use" checks. The engine's queries (starting runs, claiming due steps) are in
`storage.workflows`."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import case, delete, func, select, text
from sqlalchemy.orm import Session

from storage.db import delete_some
from storage.models import Contact, RunStatus, Template, Workflow, WorkflowRun, WorkflowTrigger, iso, utcnow
from storage.pagination import Page, keyset_page, paginate

LIVE_STATUSES = (RunStatus.ACTIVE, RunStatus.WAITING)
RUN_STATUSES = tuple(RunStatus)


@dataclass(frozen=True)
class WorkflowRef:
    """A workflow that refers to something (a template, an event name)."""

    kind: str
    """WORKFLOW or ACTION."""
    id: str
    name: str


def existing_templates(session: Session, project_id: str, ids: list[str]) -> set[str]:
    """Which of these template ids exist in the project. Their rows are share-locked (PostgreSQL) until the
    transaction ends, so a concurrent template delete (which locks the row for update, then looks for
    users) either waits and sees this workflow, or went first and the template is not found here."""
    return set(session.execute(select(Template.id).where(Template.project_id == project_id, Template.id.in_(ids))
                               .with_for_update(read=True)).scalars())


def insert_workflow(session: Session, project_id: str, values: dict[str, Any], triggers: Iterable[str]) -> Workflow:
    now = utcnow()
    workflow = Workflow(project_id=project_id, created_at=now, updated_at=now, **values)
    session.add(workflow)
    session.flush()
    set_triggers(session, workflow, triggers)
    return workflow


def set_triggers(session: Session, workflow: Workflow, events: Iterable[str]) -> None:
    session.execute(delete(WorkflowTrigger).where(WorkflowTrigger.workflow_id == workflow.id))
    for event in dict.fromkeys(events):
        session.add(WorkflowTrigger(workflow_id=workflow.id, event=event, project_id=workflow.project_id))
    session.flush()


def triggers_of(session: Session, workflow_ids: list[str]) -> dict[str, list[str]]:
    """Each workflow's trigger events, in name order."""
    found: dict[str, list[str]] = {workflow_id: [] for workflow_id in workflow_ids}
    if workflow_ids:
        rows = session.execute(select(WorkflowTrigger.workflow_id, WorkflowTrigger.event)
                               .where(WorkflowTrigger.workflow_id.in_(workflow_ids))
                               .order_by(WorkflowTrigger.workflow_id, WorkflowTrigger.event))
        for workflow_id, event in rows:
            found[workflow_id].append(event)
    return found


def get_workflow(session: Session, project_id: str, workflow_id: str, kind: str | None = None,
                 for_update: bool = False) -> Workflow | None:
    stmt = select(Workflow).where(Workflow.project_id == project_id, Workflow.id == workflow_id)
    if kind is not None:
        stmt = stmt.where(Workflow.kind == kind)
    if for_update:
        stmt = stmt.with_for_update()
    return session.execute(stmt).scalar_one_or_none()


def list_workflows(session: Session, project_id: str, kind: str, limit: int, cursor: str | None) -> Page:
    stmt = select(Workflow).where(Workflow.project_id == project_id, Workflow.kind == kind)
    return paginate(session, stmt, Workflow.id, limit, cursor)


def update_workflow(session: Session, workflow: Workflow, values: dict[str, Any]) -> Workflow:
    for column, value in values.items():
        setattr(workflow, column, value)
    workflow.updated_at = utcnow()
    session.flush()
    return workflow


def delete_runs(session: Session, workflow_id: str, limit: int) -> int:
    """A part of a workflow's deletion (`storage.db.Database.write_in_chunks`): up to `limit` of its runs."""
    runs = WorkflowRun.__table__
    return delete_some(session, runs, runs.c.workflow_id == workflow_id, limit=limit)


def delete_workflow(session: Session, workflow: Workflow) -> None:
    """The workflow, its triggers and all its runs (whatever their state)."""
    session.execute(delete(WorkflowRun).where(WorkflowRun.workflow_id == workflow.id))
    session.execute(delete(WorkflowTrigger).where(WorkflowTrigger.workflow_id == workflow.id))
    session.delete(workflow)
    session.flush()


def live_positions(session: Session, workflow_id: str) -> set[str]:
    """The step ids that ACTIVE or WAITING runs of the workflow sit on."""
    step_ids = session.execute(select(WorkflowRun.step_id).distinct().where(
        WorkflowRun.workflow_id == workflow_id, WorkflowRun.status.in_(LIVE_STATUSES))).scalars()
    return {step_id for step_id in step_ids if step_id is not None}


def list_runs(session: Session, workflow_id: str, limit: int, cursor: str | None) -> Page:
    return paginate(session, select(WorkflowRun).where(WorkflowRun.workflow_id == workflow_id), WorkflowRun.id,
                    limit, cursor)


def get_run(session: Session, workflow_id: str, run_id: str, for_update: bool = False) -> WorkflowRun | None:
    stmt = select(WorkflowRun).where(WorkflowRun.workflow_id == workflow_id, WorkflowRun.id == run_id)
    if for_update:
        stmt = stmt.with_for_update()
    return session.execute(stmt).scalar_one_or_none()


def move_delayed_runs(session: Session, workflow_id: str, delay_step: str, next_step: str, now: datetime) -> int:
    """The runs WAITING at `delay_step` become ACTIVE at `next_step`, due when their delay ends, as it was;
    returns how many."""
    runs = WorkflowRun.__table__
    return session.connection().execute(runs.update().where(
        runs.c.workflow_id == workflow_id, runs.c.status == RunStatus.WAITING, runs.c.step_id == delay_step)
        .values(status=RunStatus.ACTIVE, step_id=next_step, updated_at=now)).rowcount


def cancel_run(session: Session, run: WorkflowRun, now: datetime, step_type: str | None) -> WorkflowRun:
    """Mark a live run CANCELLED (nothing is due for it any more) and note it in its history."""
    history = list(run.history or [])
    history.append({"step": run.step_id, "type": step_type, "at": iso(now), "outcome": "cancelled"})
    run.status = RunStatus.CANCELLED
    run.due_at = None
    run.waiting_for = None
    run.history = history
    run.updated_at = now
    session.flush()
    return run


def run_stats(session: Session, workflow_id: str) -> dict[str, int]:
    """Runs by status, how many ever started, and the emails their send steps queued."""
    stats = {status.lower(): 0 for status in RUN_STATUSES}
    started = sent = 0
    rows = session.execute(select(WorkflowRun.status, func.count(), func.coalesce(func.sum(WorkflowRun.emails_sent), 0))
                           .where(WorkflowRun.workflow_id == workflow_id).group_by(WorkflowRun.status))
    for status, count, emails in rows:
        if status.lower() in stats:
            stats[status.lower()] += count
        started += count
        sent += int(emails or 0)
    return {"started": started, **stats, "emailsSent": sent}


def _definitions(session: Session, project_id: str) -> list[tuple[str, str, str, list[str], dict[str, Any]]]:
    rows = session.execute(select(Workflow.kind, Workflow.id, Workflow.name, Workflow.exclude_events,
                                  Workflow.definition).where(Workflow.project_id == project_id)
                           .order_by(Workflow.id))
    return [(row[0], row[1], row[2], list(row[3] or []), row[4] or {}) for row in rows]


def _sent_templates(definition: dict[str, Any]) -> set[str]:
    steps = definition.get("steps") if isinstance(definition, dict) else None
    return {step["template"] for step in steps or []
            if isinstance(step, dict) and step.get("type") == "send" and isinstance(step.get("template"), str)}


def template_workflows(session: Session, template_id: str) -> list[WorkflowRef]:
    """Workflows (legacy actions too) with a send step of this template, oldest first."""
    project_id = session.execute(select(Template.project_id).where(Template.id == template_id)).scalar_one_or_none()
    if project_id is None:
        return []
    return [WorkflowRef(kind, workflow_id, name) for kind, workflow_id, name, _, definition
            in _definitions(session, project_id) if template_id in _sent_templates(definition)]


def event_workflows(session: Session, project_id: str, name: str,
                    definition_events: Any) -> list[WorkflowRef]:
    """Workflows that use the event name: as a trigger, an excluding event (`notevents`), or in their
    definition (`definition_events(definition)` → the names it uses). Oldest first."""
    triggered = set(session.execute(select(WorkflowTrigger.workflow_id).where(
        WorkflowTrigger.project_id == project_id, WorkflowTrigger.event == name)).scalars())
    return [WorkflowRef(kind, workflow_id, wf_name) for kind, workflow_id, wf_name, excluded, definition
            in _definitions(session, project_id)
            if workflow_id in triggered or name in excluded or name in definition_events(definition)]


STAYING_OUTCOMES = ("waiting", "posting", "failed", "webhook failed")
"""History outcomes of a run that is still at the step (or ended there): every other one means it moved on."""
_STEPS_PASSED = {
    "sqlite": "SELECT json_extract(h.value, '$.step'), 'passed', count(*) FROM workflow_runs AS r, "
              "json_each(r.history) AS h WHERE r.workflow_id = :workflow AND json_extract(h.value, '$.outcome') "
              "NOT IN ('waiting', 'posting', 'failed', 'webhook failed') GROUP BY 1",
    "postgresql": "SELECT h.value ->> 'step', 'passed', count(*) FROM workflow_runs AS r, "
                  "json_array_elements(r.history) AS h(value) WHERE r.workflow_id = :workflow AND "
                  "h.value ->> 'outcome' NOT IN ('waiting', 'posting', 'failed', 'webhook failed') GROUP BY 1",
}
_POSITIONS = ("SELECT step_id, status, count(*), NULL FROM workflow_runs WHERE workflow_id = :workflow AND "
              "status IN ('ACTIVE', 'WAITING', 'FAILED') GROUP BY step_id, status "
              "UNION ALL SELECT NULL, 'runs', count(*), max(updated_at) FROM workflow_runs "
              "WHERE workflow_id = :workflow")
"""Runs live or failed per step (the status index), and the workflow's runs and their last change (the
(workflow_id, updated_at) index): what says whether the passed counts read before still hold."""


@dataclass(frozen=True)
class StepPositions:
    counts: dict[str, dict[str, int]]
    """Per step id: runs `waiting` there (ACTIVE or WAITING at it) and `failed` there."""
    runs: int
    live: int
    """Runs ACTIVE or WAITING, at a step or not."""
    last_change: Any
    """The newest updated_at of the workflow's runs, as the database answers it (None: no runs)."""


def step_positions(session: Session, workflow_id: str) -> StepPositions:
    """Where the workflow's runs are, in one statement over the indexes (whatever the runs' number)."""
    counts: dict[str, dict[str, int]] = {}
    runs, live, last_change = 0, 0, None
    for step_id, status, count, changed in session.execute(text(_POSITIONS), {"workflow": workflow_id}):
        if status == "runs":
            runs, last_change = int(count), changed
            continue
        if status != RunStatus.FAILED:
            live += int(count)
        if step_id is not None:
            into = counts.setdefault(str(step_id), {"waiting": 0, "passed": 0, "failed": 0})
            into["failed" if status == RunStatus.FAILED else "waiting"] += int(count)
    return StepPositions(counts, runs, live, last_change)


def steps_passed(session: Session, workflow_id: str) -> dict[str, int]:
    """Per step id: how often runs passed it (moved on from it, by their history). Reads every run's
    history: it costs what the workflow has ever run."""
    stmt = text(_STEPS_PASSED[session.get_bind().dialect.name])
    return {str(step_id): int(count) for step_id, _, count in session.execute(stmt, {"workflow": workflow_id})
            if step_id is not None}


def run_counts(session: Session, workflow_ids: list[str]) -> dict[str, dict[str, int]]:
    """Per workflow: its runs `live` (ACTIVE or WAITING) and in all, one grouped query on (workflow_id, id)."""
    counts = {workflow_id: {"live": 0, "total": 0} for workflow_id in workflow_ids}
    if workflow_ids:
        live = func.sum(case((WorkflowRun.status.in_(LIVE_STATUSES), 1), else_=0))
        for workflow_id, total, live_count in session.execute(
                select(WorkflowRun.workflow_id, func.count(), live).where(WorkflowRun.workflow_id.in_(workflow_ids))
                .group_by(WorkflowRun.workflow_id)):
            counts[workflow_id] = {"live": int(live_count or 0), "total": int(total)}
    return counts


def run_page(session: Session, workflow_id: str, limit: int, cursor: str | None) -> Page:
    """The workflow's runs newest first by cursor with their contact's email, without a total (a workflow
    may have very many)."""
    stmt = select(WorkflowRun.id, WorkflowRun.contact_id, WorkflowRun.status, WorkflowRun.step_id,
                  WorkflowRun.due_at, WorkflowRun.waiting_for, WorkflowRun.history, WorkflowRun.emails_sent,
                  WorkflowRun.created_at, WorkflowRun.updated_at, Contact.email).outerjoin(
        Contact, Contact.id == WorkflowRun.contact_id).where(WorkflowRun.workflow_id == workflow_id)
    return keyset_page(session, stmt, WorkflowRun.id, limit, cursor)
