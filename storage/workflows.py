"""Workflow queries: the workflows and their triggers, starting and resuming runs from an event (for
`pipeline.events.record_event`, in the event's own transaction), claiming due runs, advancing them, stats.

Starting runs costs nothing on the event path of a project whose workflows do not listen for the event:
a per-process cache says which event names start runs (enabled workflows' triggers) or may resume a waiting
run (every workflow's `wait` steps) for each project. A workflow written in this process is forgotten at
once and again at the commit (`workflows_changed`); one written by another process is seen within
`INTEREST_TTL` seconds.

A run's position (see `pipeline.workflows.engine` for the grammar and the engine):
* ACTIVE, `step_id` due at `due_at` (`step_id` None: the definition's first step).
* WAITING at a `wait` step for `waiting_for`, due at its timeout.
* WAITING at a `delay` step (`waiting_for` None), due at the delay's end.
* ACTIVE at a `wait` step with `waiting_for` still set: the event happened (`resume_waiting`); the engine
  takes the step's `then` branch.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from datetime import datetime
from typing import Any

from sqlalchemy import (
    JSON,
    Integer,
    String,
    bindparam,
    case,
    event,
    func,
    literal,
    select,
    update,
)
from sqlalchemy.engine import Row
from sqlalchemy.orm import Session

from storage import bulk, fastpath
from storage.batch import flush_pending
from storage.claims import DueClaim
from storage.interest import ProjectInterest
from storage.models import (
    Contact,
    Event,
    Project,
    RunStatus,
    UTCDateTime,
    Workflow,
    WorkflowRun,
    WorkflowTrigger,
    new_id,
)
from storage.segments import condition_clause

WORKFLOWS = Workflow.__table__
TRIGGERS = WorkflowTrigger.__table__
RUNS = WorkflowRun.__table__
_EVENTS = Event.__table__
_CONTACTS = Contact.__table__
LIVE = (RunStatus.ACTIVE, RunStatus.WAITING)
"""Statuses of a run that is not over."""
ENDED = (RunStatus.COMPLETED, RunStatus.EXITED, RunStatus.CANCELLED, RunStatus.FAILED)
INTEREST_TTL = 2.0
"""Seconds a process trusts its cached answer to "which events does this project's workflows listen for"."""


# ---------------------------------------------------------------------------------------------------
# Which events matter, per project (the cheap test on every event).

@dataclass(frozen=True)
class Interest:
    triggers: frozenset[str]
    """Event names that start runs of an enabled workflow."""
    waits: frozenset[str]
    """Event names some workflow's `wait` step waits for (a run may be waiting for them)."""


_NOTHING = Interest(frozenset(), frozenset())
_interest: ProjectInterest[Interest] = ProjectInterest("workflows", INTEREST_TTL)
forget = _interest.forget


def workflows_changed(session: Session, project_id: str) -> None:
    """Call in a transaction that writes a project's workflows or triggers (see `storage.interest`)."""
    _interest.changed(session, project_id)


@event.listens_for(Session, "after_flush")
def _workflows_flushed(session: Session, _context: Any) -> None:
    """Workflow or trigger rows written through the ORM (the API's `storage.workflow_admin`) mark their
    project as changed, whoever wrote them."""
    for row in (*session.new, *session.dirty, *session.deleted):
        if isinstance(row, Workflow | WorkflowTrigger) and row.project_id is not None:
            workflows_changed(session, row.project_id)


def wait_events(definition: Any) -> set[str]:
    """The event names a definition's `wait` steps wait for (odd data is skipped, never an error)."""
    steps = definition.get("steps") if isinstance(definition, dict) else None
    names = set()
    for step in steps if isinstance(steps, list) else []:
        if isinstance(step, dict) and step.get("type") == "wait" and isinstance(step.get("event"), str):
            names.add(step["event"])
    return names


def interest(session: Session, project_id: str) -> Interest:
    """The project's `Interest`, from the cache when fresh."""
    def load() -> Interest:
        conn = session.connection()
        triggers = frozenset(conn.execute(
            select(TRIGGERS.c.event).join(WORKFLOWS, WORKFLOWS.c.id == TRIGGERS.c.workflow_id)
            .where(TRIGGERS.c.project_id == project_id, WORKFLOWS.c.enabled.is_(True))).scalars())
        waits: set[str] = set()
        definitions = conn.execute(select(WORKFLOWS.c.definition).where(WORKFLOWS.c.project_id == project_id))
        for definition in definitions.scalars():
            waits |= wait_events(definition)
        return Interest(triggers, frozenset(waits)) if triggers or waits else _NOTHING

    return _interest.get(session, project_id, load)


# ---------------------------------------------------------------------------------------------------
# Starting and resuming runs.

_RUN_COLUMNS = ["id", "workflow_id", "project_id", "contact_id", "status", "step_id", "due_at", "waiting_for",
                "once_key", "trigger_event_id", "context", "history", "emails_sent", "created_at", "updated_at"]
_START: dict[str, Any] = {}


def _json_elements(dialect: str, value: Any) -> Any:
    """The text elements of a JSON array column, as a table with one column `value`."""
    fn = func.json_each if dialect == "sqlite" else func.json_array_elements_text
    return fn(value).table_valued("value")


def _start_statement(dialect: str) -> Any:
    """INSERT … SELECT one run per enabled workflow the event triggers, unless the contact did one of the
    workflow's exclude events or (run-once) already has a run of it: the unique (workflow, contact,
    once_key) index and ON CONFLICT DO NOTHING."""
    if dialect in _START:
        return _START[dialect]
    run_id = bindparam("head", type_=String()) + func.substr(WORKFLOWS.c.id, 19)
    excluded = _json_elements(dialect, WORKFLOWS.c.exclude_events)
    did_excluded = (select(_EVENTS.c.id).where(
        _EVENTS.c.contact_id == bindparam("contact_id"),
        _EVENTS.c.name.in_(select(excluded.c.value))).correlate(WORKFLOWS).exists())
    source = (select(run_id, WORKFLOWS.c.id, bindparam("project_id", type_=String()),
                     bindparam("contact_id", type_=String()), literal(RunStatus.ACTIVE, String()),
                     func.substr(WORKFLOWS.c.definition[("steps", 0, "id")].as_string(), 1, 64),
                     bindparam("now", type_=UTCDateTime()), literal(None, String()),
                     case((WORKFLOWS.c.run_once.is_(True), literal("once", String())), else_=run_id),
                     bindparam("event_id", type_=String()), bindparam("data", type_=JSON()),
                     bindparam("history", type_=JSON()), literal(0, Integer()),
                     bindparam("now", type_=UTCDateTime()), bindparam("now", type_=UTCDateTime()))
              .select_from(TRIGGERS.join(WORKFLOWS, WORKFLOWS.c.id == TRIGGERS.c.workflow_id))
              .where(TRIGGERS.c.project_id == bindparam("project_id"), TRIGGERS.c.event == bindparam("event"),
                     WORKFLOWS.c.enabled.is_(True), ~did_excluded))
    insert = fastpath.insert_for(dialect)(RUNS)
    statement = insert.from_select(_RUN_COLUMNS, source).on_conflict_do_nothing()
    _START[dialect] = statement
    return statement


def start_runs(session: Session, project_id: str, contact_id: str, event_name: str, event_id: str | None,
               data: dict[str, Any], now: datetime) -> int:
    """Start a run of every enabled workflow of the project that `event_name` triggers, for this contact,
    in one statement; returns how many started. The runs are ACTIVE at the first step, due now. The statement
    reads the contact and its events: what this transaction queued for its commit is written first."""
    flush_pending(session)
    statement = _start_statement(session.get_bind().dialect.name)
    return session.connection().execute(statement, {
        "head": new_id()[:18], "project_id": project_id, "contact_id": contact_id, "event": event_name,
        "event_id": event_id, "data": data or {}, "history": [], "now": now}).rowcount


_RESUME = (update(RUNS).where(RUNS.c.contact_id == bindparam("c"), RUNS.c.status == RunStatus.WAITING,
                              RUNS.c.waiting_for == bindparam("e"))
           .values(status=RunStatus.ACTIVE, due_at=bindparam("now"), updated_at=bindparam("now")))


def resume_waiting(session: Session, contact_id: str, event_name: str, now: datetime) -> int:
    """The contact's runs waiting for `event_name` become ACTIVE, due now, at their wait step with
    `waiting_for` still set: the engine takes the step's `then` branch. Returns how many."""
    return session.connection().execute(_RESUME, {"c": contact_id, "e": event_name, "now": now}).rowcount


def start_run(session: Session, workflow: Workflow, contact_id: str, now: datetime,
              context: dict[str, Any] | None = None) -> str | None:
    """Start one run by hand (API, tests) whatever the triggers; None when a run-once workflow already has
    a run for the contact. The run is ACTIVE at the first step, due now."""
    steps = (workflow.definition or {}).get("steps") if isinstance(workflow.definition, dict) else None
    first = steps[0].get("id") if isinstance(steps, list) and steps and isinstance(steps[0], dict) else None
    run_id = new_id()
    values: dict[str, Any] = {
        "id": run_id, "workflow_id": workflow.id, "project_id": workflow.project_id, "contact_id": contact_id,
        "status": RunStatus.ACTIVE, "step_id": str(first)[:64] if first is not None else None, "due_at": now,
        "waiting_for": None, "once_key": "once" if workflow.run_once else run_id, "trigger_event_id": None,
        "context": context or {}, "history": [], "emails_sent": 0, "created_at": now, "updated_at": now}
    insert = fastpath.insert_for(session.get_bind().dialect.name)(RUNS)
    done = session.connection().execute(insert.on_conflict_do_nothing(), values).rowcount
    return run_id if done else None


# ---------------------------------------------------------------------------------------------------
# The scheduler's side: claim due runs, read what a step needs, write the advance.

@dataclass
class RunRecord:
    id: str
    workflow_id: str
    project_id: str
    contact_id: str
    status: str
    step_id: str | None
    due_at: datetime | None
    waiting_for: str | None
    trigger_event_id: str | None
    context: dict[str, Any]
    history: list[dict[str, Any]]
    emails_sent: int
    created_at: datetime


_CLAIM_COLUMNS = [RUNS.c[field.name] for field in fields(RunRecord)]
"""Each field of RunRecord is the workflow_runs column of its name, and the record is built by name."""


def _record(row: Row[Any]) -> RunRecord:
    record = RunRecord(**row._mapping)
    record.context = record.context if isinstance(record.context, dict) else {}
    record.history = list(record.history) if isinstance(record.history, list) else []
    return record


_EARLIEST = select(func.min(RUNS.c.due_at)).where(RUNS.c.status == bindparam("status"))
"""Built once: the scheduler asks at every wake-up, and the dispatcher's process wakes for every message queued."""


def earliest_due(session: Session) -> datetime | None:
    """When the next live run is due (one index probe per live status), or None when none is live."""
    times = [fastpath.fetch(session, _EARLIEST, {"status": status})[0][0] for status in LIVE]
    return min((moment for moment in times if moment is not None), default=None)


_DUE = DueClaim(*(select(*_CLAIM_COLUMNS).where(RUNS.c.status == status, RUNS.c.due_at <= bindparam("now"))
                  .order_by(RUNS.c.due_at).limit(bindparam("limit")) for status in LIVE),
                merge_key=lambda row: row.due_at)
"""One select per live status, each read in its index order, so a backlog costs no sort."""


def claim_due(session: Session, now: datetime, limit: int, postgres: bool) -> list[RunRecord]:
    """Up to `limit` runs due by `now`, earliest first, locked until the transaction ends (no lease: the
    scheduler executes them in the claiming transaction; see `storage.claims`)."""
    return [_record(row) for row in _DUE.claim(session, now, limit, postgres)]


def get_run_record(session: Session, run_id: str, postgres: bool = False) -> RunRecord | None:
    stmt = select(*_CLAIM_COLUMNS).where(RUNS.c.id == run_id)
    if postgres:
        stmt = stmt.with_for_update()
    row = session.connection().execute(stmt).first()
    return None if row is None else _record(row)


@dataclass(frozen=True)
class WorkflowRecord:
    id: str
    project_id: str
    name: str
    exclude_events: tuple[str, ...]
    definition: dict[str, Any]
    enabled: bool


def workflows_by_id(session: Session, ids: set[str]) -> dict[str, WorkflowRecord]:
    if not ids:
        return {}
    rows = session.connection().execute(select(
        WORKFLOWS.c.id, WORKFLOWS.c.project_id, WORKFLOWS.c.name, WORKFLOWS.c.exclude_events, WORKFLOWS.c.definition,
        WORKFLOWS.c.enabled).where(WORKFLOWS.c.id.in_(ids)))
    found = {}
    for row in rows:
        excluded = tuple(str(name) for name in row.exclude_events) if isinstance(row.exclude_events, list) else ()
        definition = row.definition if isinstance(row.definition, dict) else {}
        found[row.id] = WorkflowRecord(row.id, row.project_id, row.name, excluded, definition, bool(row.enabled))
    return found


def project_senders(session: Session, ids: set[str]) -> dict[str, tuple[str, str]]:
    """Each project's default sender (email, name)."""
    table = Project.__table__
    rows = session.connection().execute(select(table.c.id, table.c.from_email, table.c.from_name)
                                        .where(table.c.id.in_(ids)))
    return {row.id: (row.from_email, row.from_name) for row in rows}


def latest_events(session: Session, contact_ids: set[str], names: set[str]) -> dict[tuple[str, str], datetime]:
    """When each of these contacts last did each of `names`, for the pairs that happened: one grouped
    query for a whole batch of runs (their exclude events)."""
    if not contact_ids or not names:
        return {}
    rows = session.connection().execute(
        select(_EVENTS.c.contact_id, _EVENTS.c.name, func.max(_EVENTS.c.created_at))
        .where(_EVENTS.c.contact_id.in_(contact_ids), _EVENTS.c.name.in_(names))
        .group_by(_EVENTS.c.contact_id, _EVENTS.c.name))
    return {(contact_id, name): at for contact_id, name, at in rows}


def contacts_matching(session: Session, project_id: str, contact_ids: list[str], condition: dict[str, Any],
                      now: datetime) -> dict[str, bool]:
    """Whether the segment condition tree matches each of these contacts, in one query (a contact that is
    gone is left out). ValueError for a tree outside the grammar."""
    clause = condition_clause(condition, now)
    rows = session.connection().execute(select(_CONTACTS.c.id, case((clause, 1), else_=0)).where(
        _CONTACTS.c.project_id == project_id, _CONTACTS.c.id.in_(contact_ids)))
    return {contact_id: bool(matched) for contact_id, matched in rows}


def event_name(session: Session, event_id: str | None) -> str | None:
    if event_id is None:
        return None
    return session.connection().execute(select(_EVENTS.c.name).where(_EVENTS.c.id == event_id)).scalar()


_POSITION = [("id", "text"), ("status", "text"), ("step_id", "text"), ("due_at", "time"), ("waiting_for", "text"),
             ("history", "json"), ("emails_sent", "int"), ("updated_at", "time")]
_POSITION_KEYS = ["run_id", *(name for name, _ in _POSITION[1:])]


def save_runs(session: Session, runs: list[dict[str, Any]]) -> None:
    """Write the runs' new positions in one statement (`storage.bulk`): each dict has run_id, status,
    step_id, due_at, waiting_for, history, emails_sent, updated_at."""
    bulk.update_rows(session, RUNS, _POSITION, [[run[key] for key in _POSITION_KEYS] for run in runs])


def advance_if_at(session: Session, run_id: str, step_id: str, leased_until: datetime,
                  values: dict[str, Any]) -> bool:
    """Move a run on from `step_id` only if it is still there under the lease this process set (a webhook
    posted after a commit); False if another scheduler took it over meanwhile."""
    stmt = update(RUNS).where(RUNS.c.id == run_id, RUNS.c.status == RunStatus.ACTIVE, RUNS.c.step_id == step_id,
                              RUNS.c.due_at == leased_until).values(**values)
    return session.connection().execute(stmt).rowcount == 1


def postpone(session: Session, run_ids: list[str], due_at: datetime) -> None:
    if run_ids:
        session.connection().execute(update(RUNS).where(RUNS.c.id.in_(run_ids)).values(due_at=due_at))
