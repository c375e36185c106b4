"""The workflow engine: run each claimed run's due step and advance the run, in one transaction.

A workflow's definition is `{"steps": [step, ...]}`, checked at the API by the models of
`pipeline.workflows.definitions`. Each claim parses the definitions of its runs' workflows once with the same
models (`parse_definition`), and each step type has its handler (`_RUN_STEPS`, `_GROUP_STEPS`); a stored step
that does not parse fails the run that reaches it with the reason in its history, never an exception. The
first step is the entry; each step has an `id` and a `type`:

    delay      seconds | minutes | until (ISO 8601 with zone); next      the next step runs then
    send       template, data (extra variables); next                    one email through `pipeline.submit`
    condition  condition (a segment condition tree); then, else          branch on the contact now
    wait       event, timeoutSeconds; then, timeout                      branch on whether the event comes
    update     data (track's merge rules), subscribed; next              change the contact
    webhook    url; next                                                 POST the run as JSON (see below)
    exit                                                                 the run ends EXITED

A missing `next` (or branch) completes the run after that step.

Durability: a run's position is its row (`storage.workflows`). `execute_due` runs in the scheduler's write
transaction, which also claimed the runs: every effect of a step (the email and outbox rows the send path
writes, the contact change and the events it records) commits together with the run's move to its next
step, so a process killed at any moment leaves each step either done and passed, or not done and still
due. Immediate steps chain in the same transaction, at most `MAX_CHAIN` of them; `delay` and `wait` end the
chain with the run due later.

Speed: a claim's runs move in waves, one step each per wave, and the steps that touch the database run
per group, not per run: the exclude-event check is one query for the wave, a `condition` one query per
(workflow, step), and a `send` one content row per (workflow, step) plus an email and an outbox row per
run, written with one executemany each (`pipeline.submit.submit_deferred`: the message is composed by the
dispatcher when it sends it, as campaign mail is). Run positions are written back in one statement
too. Against one statement per run this took 10,000 sends from ten seconds to under two.

Rules:
* Before every step, a run whose contact did one of the workflow's exclude events (legacy `notevents`)
  since the run started EXITs.
* A disabled workflow's runs are paused: a run that comes due is put off by `PAUSE_SECONDS` without
  running anything, so re-enabling the workflow resumes them where they were (within that time).
* Send: template variables are the contact's data when the email is sent, then the trigger event's data
  (the run's context), then the step's `data`. A MARKETING template is marketing mail (signed unsubscribe
  links; `submit_deferred` records a SKIPPED email for a contact who is not subscribed, which does not count
  in `emails_sent`). A missing template or an unverified sender fails the run with the reason.
* Webhooks are the one effect outside the database, so they are delivered at least once, after the commit:
  the step leases the run (due again in `WEBHOOK_LEASE_SECONDS`) and hands the request to the scheduler,
  which POSTs `{workflow: {id, name}, run: {id}, contact: {id, email, data}, event: {id, name, data}}` and
  then, in a second transaction, moves the run on (`finish_webhook`). A process that dies in between posts
  it again when the lease runs out. The POST is an endpoint webhook's (`webhooks.client`: no
  redirects, `webhooks.timeout_seconds`, `max_response_bytes`, only public addresses unless
  `allow_private_targets`). A failed POST (no 2xx) is retried `WEBHOOK_ATTEMPTS` times with backoff, then
  the run fails.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy.orm import Session

from pipeline.compose import MAX_RENDERED_HEADER, MessageSpec, bulk_feedback_id, looks_like_html
from pipeline.contacts import update_contact
from pipeline.errors import PipelineError
from pipeline.links import LinkSigner
from pipeline.marketing.templates import template_spec
from pipeline.submit import DeferredRecipient, submit_deferred
from pipeline.workflows.definitions import (
    BrokenStep,
    ConditionStep,
    DelayStep,
    ExitStep,
    RunnableStep,
    SendStep,
    UpdateStep,
    WaitStep,
    WebhookStep,
    parse_definition,
)
from storage import contacts as contact_store
from storage import reputation as reputation_store
from storage import templates as template_store
from storage import workflows as store
from storage.batch import discard_pending, flush_pending
from storage.models import iso
from storage.workflows import RunRecord, WorkflowRecord

log = logging.getLogger("plunkd.workflows")
MAX_CHAIN = 20
"""Immediate steps one run may take in one transaction; more continue at the next claim."""
PAUSE_SECONDS = 30.0
WEBHOOK_LEASE_SECONDS = 60.0
WEBHOOK_ATTEMPTS = 5
SOURCE = "workflow"
"""The `source` of the emails a send step writes."""
_EPOCH = datetime.min.replace(tzinfo=UTC)


@dataclass
class Webhook:
    """A POST to make after the commit, and where the run goes when it succeeded."""

    run_id: str
    step_id: str
    url: str
    payload: dict[str, Any]
    leased_until: datetime


@dataclass
class Executed:
    """What one transaction of the engine did."""

    runs: int = 0
    steps: int = 0
    emails: int = 0
    webhooks: list[Webhook] = field(default_factory=list)

    def add(self, other: Executed) -> None:
        self.steps += other.steps
        self.emails += other.emails
        self.webhooks.extend(other.webhooks)


class _StepFailed(Exception):
    """The run cannot go on (odd definition, missing template…): it FAILS with this reason."""


@dataclass
class _Run:
    """A run's position while the engine moves it (written back with `store.save_runs`)."""

    record: RunRecord
    status: str
    step_id: str | None
    due_at: datetime | None
    waiting_for: str | None
    history: list[dict[str, Any]]
    emails_sent: int
    workflow: WorkflowRecord | None = None
    due_note: dict[str, str] = field(default_factory=dict)
    """`{"due": …}` until the first step of this claim is noted: its history entry says when it was due."""

    @classmethod
    def of(cls, record: RunRecord) -> _Run:
        return cls(record, record.status, record.step_id, record.due_at, record.waiting_for, list(record.history),
                   record.emails_sent, due_note={"due": iso(record.due_at)} if record.due_at is not None else {})

    def note(self, step: RunnableStep | BrokenStep | None, step_id: str | None, now: datetime, outcome: str,
             **extra: Any) -> None:
        self.history.append({"step": step_id, "type": step.type if step else None, "at": iso(now),
                             "outcome": outcome, **self.due_note, **extra})
        self.due_note = {}

    def go(self, next_id: Any, now: datetime) -> None:
        """On to `next_id` now, or COMPLETED when there is none."""
        self.waiting_for = None
        if next_id is None:
            self.status, self.step_id, self.due_at = "COMPLETED", None, None
        else:
            self.status, self.step_id, self.due_at = "ACTIVE", str(next_id)[:64], now

    def end(self, status: str) -> None:
        self.status, self.due_at, self.waiting_for = status, None, None

    def fail(self, step: RunnableStep | BrokenStep | None, step_id: str | None, now: datetime, reason: str) -> None:
        self.note(step, step_id, now, "failed", reason=reason)
        self.end("FAILED")

    def may_go_on(self, now: datetime) -> bool:
        """Due again within this transaction (its next step is immediate)?"""
        return self.status == "ACTIVE" and self.due_at is not None and self.due_at <= now

    def row(self, now: datetime) -> dict[str, Any]:
        return {"run_id": self.record.id, "status": self.status, "step_id": self.step_id, "due_at": self.due_at,
                "waiting_for": self.waiting_for, "history": self.history, "emails_sent": self.emails_sent,
                "updated_at": now}


class _Batch:
    """Per-transaction lookups shared by the runs of one claim."""

    def __init__(self, session: Session, runs: list[RunRecord], links: LinkSigner | None,
                 max_bytes: int | None = None) -> None:
        self.session = session
        self.links = links
        self.max_bytes = max_bytes
        self.workflows = store.workflows_by_id(session, {run.workflow_id for run in runs})
        self.senders = store.project_senders(session, {run.project_id for run in runs}) if runs else {}
        self.steps = {workflow_id: parse_definition(workflow.definition)
                      for workflow_id, workflow in self.workflows.items()}
        self._specs: dict[tuple[str, str, str], MessageSpec | str] = {}
        self._paused: dict[str, bool] = {}

    def sending_paused(self, project_id: str) -> bool:
        """Whether the reputation guard holds the project's workflow sends (`pipeline.reputation`)."""
        if project_id not in self._paused:
            self._paused[project_id] = reputation_store.marketing_paused(self.session, project_id)
        return self._paused[project_id]

    def spec(self, project_id: str, workflow_id: str, template_id: str) -> MessageSpec:
        """The message a send of this template by this workflow composes (bulk mail: its Feedback-ID names
        the workflow); _StepFailed when it cannot be sent."""
        key = (project_id, workflow_id, template_id)
        if key not in self._specs:
            template = template_store.get_template(self.session, project_id, template_id)
            if template is None:
                self._specs[key] = f"template {template_id} not found"
            else:
                try:
                    spec = template_spec(template, self.senders.get(project_id, ("", "")), self.links)
                    spec.feedback_id = bulk_feedback_id(workflow_id, project_id, spec.from_email)
                    self._specs[key] = spec
                except (ValueError, PipelineError) as exc:
                    self._specs[key] = f"template {template_id}: {getattr(exc, 'message', exc)}"
        found = self._specs[key]
        if isinstance(found, str):
            raise _StepFailed(found)
        return found


def run_due(session: Session, now: datetime, limit: int, links: LinkSigner | None, postgres: bool,
            max_bytes: int | None = None) -> Executed:
    """Claim up to `limit` due runs and execute them, in this transaction."""
    return execute_due(session, store.claim_due(session, now, limit, postgres), now, links, max_bytes)


def execute_due(session: Session, runs: list[RunRecord], now: datetime, links: LinkSigner | None,
                max_bytes: int | None = None) -> Executed:
    """Run each claimed run's due step (and the immediate steps after it) and write every run's new position,
    in the caller's transaction. When the batch raises unexpectedly it is run again one run at a time (a
    savepoint each), so the run at fault fails alone and the others keep their effects. With `max_bytes`
    (`smtp.max_message_bytes`) a send step fails a run whose email would render larger."""
    if not runs:
        return Executed()
    flush_pending(session)  # rows other work queued before us stay out of our savepoint's fate
    batch = _Batch(session, runs, links, max_bytes)
    savepoint = session.begin_nested()
    try:
        done = Executed(runs=len(runs))
        moved = [_Run.of(record) for record in runs]
        _advance(batch, moved, now, done)
        store.save_runs(session, [run.row(now) for run in moved])
        flush_pending(session)
        savepoint.commit()
        return done
    except Exception:
        discard_pending(session)
        savepoint.rollback()
        log.exception("a workflow batch failed; running its %d runs one by one", len(runs))
    batch = _Batch(session, runs, links, max_bytes)
    done = Executed(runs=len(runs))
    for record in runs:
        savepoint = session.begin_nested()
        one = Executed()
        run = _Run.of(record)
        try:
            _advance(batch, [run], now, one)
            store.save_runs(session, [run.row(now)])
            flush_pending(session)
            savepoint.commit()
        except Exception as exc:
            discard_pending(session)
            savepoint.rollback()
            log.exception("workflow run %s failed", record.id)
            failed = _Run.of(record)
            failed.fail(None, record.step_id, now, f"internal error: {type(exc).__name__}: {exc}")
            store.save_runs(session, [failed.row(now)])
            continue
        done.add(one)
    return done


def _advance(batch: _Batch, runs: list[_Run], now: datetime, done: Executed) -> None:
    """Move the runs, one step each per wave, until each waits for a later time or has ended."""
    live = []
    for run in runs:
        run.workflow = batch.workflows.get(run.record.workflow_id)
        if run.workflow is None:
            run.fail(None, run.step_id, now, "the workflow is gone")
        elif not run.workflow.enabled:
            run.due_at = now + timedelta(seconds=PAUSE_SECONDS)
        else:
            live.append(run)
    for _ in range(MAX_CHAIN):
        if not live:
            return
        live = _wave(batch, live, now, done)


def _wave(batch: _Batch, runs: list[_Run], now: datetime, done: Executed) -> list[_Run]:
    """One step of each run; returns the runs whose next step is due now."""
    placed: list[tuple[_Run, RunnableStep | BrokenStep, str]] = []
    for run in runs:
        assert run.workflow is not None
        definition = batch.steps[run.workflow.id]
        step_id = run.step_id or definition.entry
        step = definition.steps.get(step_id) if step_id is not None else None
        if step is None:
            run.fail(None, step_id, now, f"step {step_id!r} is not in the workflow" if step_id
                     else "the workflow has no steps")
        else:
            placed.append((run, step, str(step_id)))
    placed = _exit_excluded(batch, placed, now)
    going: list[_Run] = []
    grouped: dict[tuple[str, str, str], list[_Run]] = defaultdict(list)
    for run, step, step_id in placed:
        done.steps += 1
        if isinstance(step, BrokenStep):
            run.fail(step, step_id, now, step.reason)
            continue
        if step.type in _GROUP_STEPS:
            assert run.workflow is not None
            grouped[(step.type, run.workflow.id, step_id)].append(run)
            continue
        try:
            if _RUN_STEPS[step.type](batch, run, step, step_id, now, done):
                going.append(run)
        except _StepFailed as exc:
            run.fail(step, step_id, now, str(exc))
    for (kind, workflow_id, step_id), group in grouped.items():
        step = batch.steps[workflow_id].steps[step_id]
        try:
            _GROUP_STEPS[kind](batch, group, step, step_id, now, done)
        except _StepFailed as exc:
            for run in group:
                if run.status in store.LIVE:  # not failed alone already (a contact that is gone)
                    run.fail(step, step_id, now, str(exc))
        going.extend(group)
    return [run for run in going if run.may_go_on(now)]


def _exit_excluded(batch: _Batch, placed: list[tuple[_Run, RunnableStep | BrokenStep, str]],
                   now: datetime) -> list[tuple[_Run, RunnableStep | BrokenStep, str]]:
    """Runs whose contact did one of the workflow's exclude events since the run started EXIT (one query
    for the wave); the others are returned."""
    watched = [run for run, _, _ in placed if run.workflow is not None and run.workflow.exclude_events]
    if not watched:
        return placed
    names = {name for run in watched if run.workflow is not None for name in run.workflow.exclude_events}
    latest = store.latest_events(batch.session, {run.record.contact_id for run in watched}, names)
    kept = []
    for run, step, step_id in placed:
        assert run.workflow is not None
        did = next((name for name in run.workflow.exclude_events
                    if latest.get((run.record.contact_id, name), _EPOCH) >= run.record.created_at), None)
        if did is None:
            kept.append((run, step, step_id))
        else:
            run.note(step, step_id, now, "exited", reason=f"the contact did {did}")
            run.end("EXITED")
    return kept


def _delay(batch: _Batch, run: _Run, step: DelayStep, step_id: str, now: datetime, done: Executed) -> bool:
    """The run WAITs at the delay step until its end, as at a `wait` step: its position is the step it is
    at. (A run an older plunkd delayed sits ACTIVE at the next step, due at the delay's end: it goes on.)"""
    if run.status == "WAITING":  # due at the delay's end
        run.note(step, step_id, now, "delayed")
        run.go(step.next, now)
        return True
    until = step.due(now)
    if until <= now:
        run.note(step, step_id, now, "delayed", until=iso(until))
        run.go(step.next, now)
        return True
    run.status, run.due_at = "WAITING", until
    run.note(step, step_id, now, "waiting", until=iso(until))
    return False


def _wait(batch: _Batch, run: _Run, step: WaitStep, step_id: str, now: datetime, done: Executed) -> bool:
    if run.status == "WAITING":  # due at its timeout
        run.note(step, step_id, now, "timeout", event=step.event)
        run.go(step.timeout, now)
        return True
    if run.waiting_for is not None:  # the event came (`storage.workflows.resume_waiting`)
        run.note(step, step_id, now, "event", event=step.event)
        run.go(step.then, now)
        return True
    run.status, run.waiting_for = "WAITING", step.event
    run.due_at = now + timedelta(seconds=step.timeoutSeconds)
    run.note(step, step_id, now, "waiting", event=step.event, until=iso(run.due_at))
    return False


def _update(batch: _Batch, run: _Run, step: UpdateStep, step_id: str, now: datetime, done: Executed) -> bool:
    try:
        update_contact(batch.session, run.record.project_id, run.record.contact_id, None, step.subscribed, step.data)
    except PipelineError as exc:
        raise _StepFailed(exc.message) from exc
    run.note(step, step_id, now, "updated")
    run.go(step.next, now)
    return True


def _webhook(batch: _Batch, run: _Run, step: WebhookStep, step_id: str, now: datetime, done: Executed) -> bool:
    record = run.record
    contact = contact_store.get_contact(batch.session, record.project_id, record.contact_id)
    if contact is None:
        raise _StepFailed("the contact is gone")
    assert run.workflow is not None
    leased = now + timedelta(seconds=WEBHOOK_LEASE_SECONDS)
    payload = {"workflow": {"id": run.workflow.id, "name": run.workflow.name}, "run": {"id": record.id},
               "contact": {"id": contact.id, "email": contact.email, "data": contact.data or {}},
               "event": {"id": record.trigger_event_id,
                         "name": store.event_name(batch.session, record.trigger_event_id),
                         "data": record.context}}
    done.webhooks.append(Webhook(record.id, step_id, step.url, payload, leased))
    run.status, run.step_id, run.due_at, run.waiting_for = "ACTIVE", step_id, leased, None
    if run.due_note:
        run.note(step, step_id, now, "posting")
    return False


def _exit(batch: _Batch, run: _Run, step: ExitStep, step_id: str, now: datetime, done: Executed) -> bool:
    run.note(step, step_id, now, "exit")
    run.end("EXITED")
    return False


def _send_group(batch: _Batch, runs: list[_Run], step: SendStep, step_id: str, now: datetime,
                done: Executed) -> None:
    """A send step for a group of runs at it: the template once, then an email per run's contact
    through `submit_deferred` (one content row for the group). A contact who is gone fails its run; a
    MARKETING template to a contact who is not subscribed records a SKIPPED email (not counted as sent). While
    the reputation guard holds the project's workflow sends, the runs wait at the step instead."""
    extra = step.data
    project_id = runs[0].record.project_id
    if batch.sending_paused(project_id):
        for run in runs:  # each waits at this step, as a disabled workflow's runs do
            run.due_at = now + timedelta(seconds=PAUSE_SECONDS)
        return
    spec = batch.spec(project_id, runs[0].record.workflow_id, step.template)
    contacts = contact_store.addresses_by_id(batch.session, project_id, [run.record.contact_id for run in runs])
    too_large = _too_large(batch, spec, project_id, runs, extra or {})
    sending, recipients = [], []
    for run in runs:
        found = contacts.get(run.record.contact_id)
        if found is None:
            run.fail(step, step_id, now, "the contact is gone")
            continue
        if run.record.id in too_large:
            run.fail(step, step_id, now, too_large[run.record.id])
            continue
        sending.append(run)
        recipients.append(DeferredRecipient(run.record.contact_id, *found,
                                            variables={**run.record.context, **(extra or {})}))
    if not sending:
        return
    try:
        queued = submit_deferred(batch.session, project_id, SOURCE, spec, recipients)
    except PipelineError as exc:
        raise _StepFailed(exc.message) from exc
    for run, recipient, email in zip(sending, recipients, queued, strict=True):
        if spec.links is not None and not recipient.subscribed:
            run.note(step, step_id, now, "skipped", reason="the contact is not subscribed (marketing mail)")
        else:
            run.emails_sent += 1
            done.emails += 1
            run.note(step, step_id, now, "sent", email=email.email_id)
        run.go(step.next, now)


def _too_large(batch: _Batch, spec: MessageSpec, project_id: str, runs: list[_Run],
               extra: dict[str, Any]) -> dict[str, str]:
    """Runs whose email would render larger than the message size limit, with the reason, by run id. The
    subject and body are measured as the dispatcher will render them (the contact's data now, the run's
    event data, the step's data), without rendering; the MIME around them is checked when it is composed."""
    subject, body = spec.template(spec.subject), spec.template(spec.body)
    if batch.max_bytes is None or not subject.uses and not body.uses:
        return {}
    escape = spec.style == "PLUNK" or looks_like_html(spec.body)
    data = contact_store.data_by_id(batch.session, project_id, [run.record.contact_id for run in runs])
    refused = {}
    for run in runs:
        variables = {**data.get(run.record.contact_id, {}), **run.record.context, **extra}
        subject_bytes = subject.size(variables)
        if subject_bytes > MAX_RENDERED_HEADER:
            refused[run.record.id] = f"the subject would render to more than {MAX_RENDERED_HEADER} bytes"
        elif subject_bytes + body.size(variables, escape) > batch.max_bytes:
            refused[run.record.id] = (f"the email would be larger than {batch.max_bytes} bytes once rendered "
                                      "(the message size limit, smtp.max_message_bytes)")
    return refused


def _condition_group(batch: _Batch, runs: list[_Run], step: ConditionStep, step_id: str, now: datetime,
                     done: Executed) -> None:
    """A condition step for a group of runs at it: the tree is matched against all their contacts in one
    query, and each run takes `then` or `else`."""
    try:
        matched = store.contacts_matching(batch.session, runs[0].record.project_id,
                                          [run.record.contact_id for run in runs], step.condition, now)
    except (ValueError, TypeError, KeyError) as exc:
        raise _StepFailed(f"step {step_id!r} has a bad condition: {exc}") from exc
    for run in runs:
        found = matched.get(run.record.contact_id)
        if found is None:
            run.fail(step, step_id, now, "the contact is gone")
            continue
        run.note(step, step_id, now, "then" if found else "else")
        run.go(step.then if found else step.else_, now)


_RUN_STEPS: dict[str, Callable[..., bool]] = {"delay": _delay, "wait": _wait, "update": _update,
                                              "webhook": _webhook, "exit": _exit}
"""Step type → its handler, for the types run one run at a time; True when the run's next step may run now."""
_GROUP_STEPS: dict[str, Callable[..., None]] = {"send": _send_group, "condition": _condition_group}
"""Step types run per (workflow, step) group of a wave, each in a few statements for the whole group."""


def finish_webhook(session: Session, hook: Webhook, status: int | None, error: str | None, now: datetime) -> bool:
    """After the POST: on a 2xx move the run to the step's `next` (due now), else retry later or fail the
    run. Nothing when the run left the lease meanwhile (cancelled, or another scheduler took it over after
    the lease ran out). Returns whether the run moved."""
    record = store.get_run_record(session, hook.run_id, session.get_bind().dialect.name == "postgresql")
    if record is None or (record.status, record.step_id, record.due_at) != ("ACTIVE", hook.step_id,
                                                                           hook.leased_until):
        return False
    run = _Run.of(record)
    run.due_note = {}  # due was the lease, not a step's time
    workflow = store.workflows_by_id(session, {record.workflow_id}).get(record.workflow_id)
    step = parse_definition(workflow.definition if workflow else {}).steps.get(hook.step_id)
    if not isinstance(step, WebhookStep):  # the workflow changed meanwhile: the run completes
        step = WebhookStep.model_construct(id=hook.step_id, type="webhook", url=hook.url, next=None)
    if status is not None and 200 <= status < 300:
        run.note(step, hook.step_id, now, "posted", status=status)
        run.go(step.next, now)
    else:
        failures = 0
        for entry in reversed(run.history):
            if entry.get("step") != hook.step_id or entry.get("outcome") != "webhook failed":
                break
            failures += 1
        reason = error or f"HTTP {status}"
        run.note(step, hook.step_id, now, "webhook failed", reason=reason)
        if failures + 1 >= WEBHOOK_ATTEMPTS:
            run.note(step, hook.step_id, now, "failed", reason=f"webhook gave up after {failures + 1} attempts: "
                                                               f"{reason}")
            run.end("FAILED")
        else:
            run.due_at = now + timedelta(seconds=2 ** failures * 5)
    values = run.row(now)
    values.pop("run_id")
    return store.advance_if_at(session, hook.run_id, hook.step_id, hook.leased_until, values)
