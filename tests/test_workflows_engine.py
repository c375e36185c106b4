"""The workflow engine on the real app and database (SQLite, or PostgreSQL with PLUNKD_TEST_DATABASE_URL):
events start runs in their own transaction, the scheduler runs due steps exactly once (delay, send,
condition, wait, update, webhook, exit), exclude events, run-once, restarts. Workflows are made through
`storage.workflows` (the HTTP API is tested with it)."""

from __future__ import annotations

import asyncio
import email
import time
from datetime import UTC, datetime, timedelta
from email import policy

import pytest
from aiohttp import web
from sqlalchemy import func, select

from api.context import CONFIG, LINKS
from automation.scheduler import WorkflowScheduler
from delivery.bucket import TokenBucket
from delivery.dispatcher import Dispatcher
from delivery.transports import FileTransport
from pipeline.track import track
from pipeline.workflows import engine as engine
from storage import workflow_admin as admin
from storage import workflows as store
from storage.models import Contact, Email, Event, OutboxItem, Workflow, WorkflowRun, WorkflowTrigger, new_id, utcnow
from tests.test_campaigns import dispatcher_for
from tests.test_delivery import dispatch_all, settings
from tests.test_workflows_api import MILLISECOND_TIME

BODY = "<p>Plan {{plan}}, coupon {{coupon ?? none}}, from {{source ?? nowhere}}</p>"


async def make_template(api, kind: str = "TRANSACTIONAL", subject: str = "Hi {{plan ?? there}}",
                        body: str = BODY) -> str:
    status, reply = await api.call("POST", "/templates", json={"name": f"t-{kind}", "subject": subject, "body": body,
                                                               "type": kind})
    assert status == 201, reply
    return reply["data"]["id"]


async def make_workflow(api, steps: list[dict], triggers: list[str], **fields) -> str:
    values = {"name": "wf", "exclude_events": [], "enabled": True, "run_once": False, "kind": "WORKFLOW", **fields,
              "definition": {"steps": steps}}

    def work(session):
        return admin.insert_workflow(session, api.project_id, values, triggers).id

    return await api.db.write(work)


def scheduler_for(api, on_queued=lambda: None) -> WorkflowScheduler:
    """A scheduler with the app's [webhooks] settings, under which webhook steps POST."""
    return WorkflowScheduler(api.db, api.client.app[LINKS], on_queued, poll_seconds=0.05,
                             webhooks=api.client.app[CONFIG].webhooks)


async def track_event(api, email_address: str, event: str, data: dict | None = None, key: str | None = None) -> dict:
    status, reply = await api.call("POST", "/v1/track", key=key,
                                   json={"email": email_address, "event": event, "data": data or {}})
    assert status == 200, reply
    return reply["data"]


async def runs_of(api, workflow_id: str) -> list[WorkflowRun]:
    def read(session):
        return list(session.execute(select(WorkflowRun).where(WorkflowRun.workflow_id == workflow_id)
                                    .order_by(WorkflowRun.id)).scalars())

    return await api.db.read(read)


async def one_run(api, workflow_id: str) -> WorkflowRun:
    runs = await runs_of(api, workflow_id)
    assert len(runs) == 1, runs
    return runs[0]


async def emails_to(api, address: str) -> list[Email]:
    return await api.db.read(lambda s: list(s.execute(select(Email).where(Email.recipient == address)
                                                      .order_by(Email.id)).scalars()))


async def contact(api, address: str) -> Contact:
    return await api.db.read(lambda s: s.execute(select(Contact).where(Contact.email == address)).scalar_one())


async def wait_for(predicate, seconds: float = 5.0, step: float = 0.05):
    deadline = time.monotonic() + seconds
    while True:
        value = await predicate()
        if value or time.monotonic() > deadline:
            return value
        await asyncio.sleep(step)


def outcomes(run: WorkflowRun) -> list[str]:
    return [entry["outcome"] for entry in run.history]


async def test_track_then_delay_then_send_reaches_the_outbox_and_is_delivered(api, sender, tmp_path):
    template = await make_template(api)
    workflow = await make_workflow(api, [
        {"id": "wait", "type": "delay", "seconds": 2, "next": "mail"},
        {"id": "mail", "type": "send", "template": template, "data": {"coupon": "C-42"}},
    ], ["signed-up"])
    scheduler = scheduler_for(api)
    task = asyncio.create_task(scheduler.run())
    try:
        started = time.monotonic()
        await track_event(api, "ann@example.org", "signed-up", {"plan": "pro", "source": {"value": "ad",
                                                                                          "persistent": False}})
        assert await wait_for(lambda: _delayed_at(api, workflow, "wait"), 2), "the run WAITs at the delay step"
        assert await emails_to(api, "ann@example.org") == []
        run = await wait_for(lambda: _ended(api, workflow), 5)
        elapsed = time.monotonic() - started
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    # The delay holds (2 s at least) and ends on time (`lateness` below); the whole run may take longer on a
    # loaded machine (CI once picked the first step up 1.85 s after the track, with four test processes
    # on two cores).
    assert run.status == "COMPLETED" and run.emails_sent == 1 and 2.0 <= elapsed < 5.0, (run.history, elapsed)
    assert outcomes(run) == ["waiting", "delayed", "sent"]
    fired = run.history[1]
    # History times are the API's: milliseconds and a Z, like every other time a client reads.
    assert all(MILLISECOND_TIME.fullmatch(entry[key]) for entry in run.history for key in ("at", "due", "until")
               if key in entry), run.history
    lateness = (datetime.fromisoformat(fired["at"]) - datetime.fromisoformat(fired["due"])).total_seconds()
    assert 0 <= lateness < 1.0
    assert run.context == {"plan": "pro", "source": "ad"}  # the trigger's variables, one-shot ones too
    [queued] = await emails_to(api, "ann@example.org")
    assert queued.status == "QUEUED" and queued.source == "workflow" and queued.subject == "Hi {{plan ?? there}}"
    assert queued.message_id == f"<{queued.id}@example.com>", "given when the step queued it"
    folder = tmp_path / "outbox"
    await dispatch_all(dispatcher_for(api, folder))  # composes the deferred email, as `plunkd serve` does
    [path] = list(folder.glob("*.eml"))
    message = email.message_from_bytes(path.read_bytes(), policy=policy.default)
    assert message["Subject"] == "Hi pro" and message["To"] == "ann@example.org"
    assert message["Message-ID"] == queued.message_id
    text = message.get_body(("html",)).get_content()
    assert "Plan pro, coupon C-42, from ad" in text


async def _delayed_at(api, workflow: str, step: str):
    """The workflow's one run WAITs at `step`, due later (the graph and the API show it there)."""
    runs = await runs_of(api, workflow)
    return runs and (runs[0].status, runs[0].step_id, runs[0].waiting_for) == ("WAITING", step, None) \
        and runs[0].due_at > utcnow()


async def _ended(api, workflow: str):
    runs = await runs_of(api, workflow)
    return runs[0] if runs and runs[0].status not in store.LIVE else None


async def test_exclude_events_stop_a_run_and_keep_contacts_from_starting(api, sender):
    template = await make_template(api)
    workflow = await make_workflow(api, [
        {"id": "wait", "type": "delay", "seconds": 1, "next": "mail"},
        {"id": "mail", "type": "send", "template": template},
    ], ["trial-started"], exclude_events=["purchased"])
    scheduler = scheduler_for(api)
    await track_event(api, "bob@example.org", "trial-started")
    await scheduler.run_until_idle()
    await track_event(api, "bob@example.org", "purchased")
    await asyncio.sleep(1.1)
    await scheduler.run_until_idle()
    run = await one_run(api, workflow)
    assert run.status == "EXITED" and outcomes(run) == ["waiting", "exited"]
    assert run.history[-1]["step"] == "wait", "it left at the delay it was in"
    assert run.history[-1]["reason"] == "the contact did purchased"
    assert await emails_to(api, "bob@example.org") == []
    # a contact who already did an exclude event starts no run
    await track_event(api, "bob@example.org", "trial-started")
    assert len(await runs_of(api, workflow)) == 1
    await track_event(api, "cid@example.org", "trial-started")
    assert len(await runs_of(api, workflow)) == 2


async def test_run_once_and_re_entry(api, sender):
    once = await make_workflow(api, [{"id": "x", "type": "exit"}], ["visit"], run_once=True, name="once")
    again = await make_workflow(api, [{"id": "x", "type": "exit"}], ["visit"], name="again")
    for _ in range(3):
        await track_event(api, "dee@example.org", "visit")
    assert len(await runs_of(api, once)) == 1
    assert len(await runs_of(api, again)) == 3
    await scheduler_for(api).run_until_idle()
    assert [r.status for r in await runs_of(api, once)] == ["EXITED"]
    await track_event(api, "dee@example.org", "visit")  # an ended run-once run still blocks a second one
    assert len(await runs_of(api, once)) == 1 and len(await runs_of(api, again)) == 4


async def test_disabled_workflows_start_nothing_and_pause_their_runs(api, sender):
    workflow = await make_workflow(api, [{"id": "d", "type": "delay", "seconds": 0, "next": "x"},
                                         {"id": "x", "type": "exit"}], ["visit"])
    await track_event(api, "eve@example.org", "visit")

    def disable(session, enabled=False):
        admin.update_workflow(session, admin.get_workflow(session, api.project_id, workflow), {"enabled": enabled})

    await api.db.write(disable)
    await track_event(api, "eve@example.org", "visit")
    assert len(await runs_of(api, workflow)) == 1
    await scheduler_for(api).run_until_idle()
    run = await one_run(api, workflow)
    assert run.status == "ACTIVE" and run.history == [] and run.due_at > utcnow() + timedelta(seconds=20)
    await api.db.write(lambda s: disable(s, True))
    await api.db.write(lambda s: store.postpone(s, [run.id], utcnow()))
    await scheduler_for(api).run_until_idle()
    assert (await one_run(api, workflow)).status == "EXITED"


async def test_condition_branches_on_data_and_on_an_event(api, sender):
    workflow = await make_workflow(api, [
        {"id": "plan", "type": "condition", "condition": {"field": "data.plan", "op": "equals", "value": "pro"},
         "then": "bought", "else": "free"},
        {"id": "bought", "type": "condition", "condition": {"event": "purchased", "op": "did"},
         "then": "buyer", "else": "looker"},
        {"id": "buyer", "type": "update", "data": {"path": "pro-buyer"}},
        {"id": "looker", "type": "update", "data": {"path": "pro-looker"}},
        {"id": "free", "type": "update", "data": {"path": "free"}},
    ], ["check"])
    await track_event(api, "pro1@example.org", "purchased", {"plan": "pro"})
    await track_event(api, "pro1@example.org", "check")
    await track_event(api, "pro2@example.org", "check", {"plan": "pro"})
    await track_event(api, "free@example.org", "check", {"plan": "free"})
    await scheduler_for(api).run_until_idle()
    assert (await contact(api, "pro1@example.org")).data["path"] == "pro-buyer"
    assert (await contact(api, "pro2@example.org")).data["path"] == "pro-looker"
    assert (await contact(api, "free@example.org")).data["path"] == "free"
    assert {r.status for r in await runs_of(api, workflow)} == {"COMPLETED"}
    runs = {r.contact_id: outcomes(r) for r in await runs_of(api, workflow)}
    assert runs[(await contact(api, "pro1@example.org")).id] == ["then", "then", "updated"]


async def test_wait_for_an_event_and_its_timeout(api, sender):
    """The timeout is ten minutes and is made to come by moving the waiting run's due time to now, so a slow
    machine cannot let it pass before the event (a one-second timeout did, once, on a loaded CI run)."""
    workflow = await make_workflow(api, [
        {"id": "w", "type": "wait", "event": "confirmed", "timeoutSeconds": 600, "then": "yes", "timeout": "no"},
        {"id": "yes", "type": "update", "data": {"confirmed": True}},
        {"id": "no", "type": "update", "data": {"confirmed": False}},
    ], ["registered"])
    scheduler = scheduler_for(api)
    await track_event(api, "fay@example.org", "registered")
    await track_event(api, "gus@example.org", "registered")
    await scheduler.run_until_idle()
    assert {r.status for r in await runs_of(api, workflow)} == {"WAITING"}
    await track_event(api, "fay@example.org", "confirmed")
    await scheduler.run_until_idle()
    assert (await contact(api, "fay@example.org")).data["confirmed"] is True
    assert "confirmed" not in (await contact(api, "gus@example.org")).data
    waiting = WorkflowRun.__table__.c.status == "WAITING"
    await api.db.write(lambda s: s.execute(WorkflowRun.__table__.update().where(waiting).values(due_at=utcnow())))
    await scheduler.run_until_idle()
    assert (await contact(api, "gus@example.org")).data["confirmed"] is False
    by_contact = {r.contact_id: r for r in await runs_of(api, workflow)}
    assert outcomes(by_contact[(await contact(api, "fay@example.org")).id]) == ["waiting", "event", "updated"]
    assert outcomes(by_contact[(await contact(api, "gus@example.org")).id]) == ["waiting", "timeout", "updated"]
    # a late event resumes nothing
    await track_event(api, "gus@example.org", "confirmed")
    assert {r.status for r in await runs_of(api, workflow)} == {"COMPLETED"}


async def test_update_changes_data_and_subscription_and_records_the_event(api, sender):
    workflow = await make_workflow(api, [
        {"id": "u", "type": "update", "data": {"tier": "gold", "plan": None}, "subscribed": False},
    ], ["downgrade"])
    listener = await make_workflow(api, [{"id": "x", "type": "exit"}], ["contact.unsubscribed"], name="listener")
    await track_event(api, "hal@example.org", "downgrade", {"plan": "pro"})
    await scheduler_for(api).run_until_idle()
    hal = await contact(api, "hal@example.org")
    assert hal.data == {"tier": "gold"} and hal.subscribed is False
    names = await api.db.read(lambda s: list(s.execute(select(Event.name).where(Event.contact_id == hal.id)
                                                       .order_by(Event.id)).scalars()))
    assert names == ["downgrade", "contact.unsubscribed"]
    assert (await one_run(api, workflow)).status == "COMPLETED"
    assert len(await runs_of(api, listener)) == 1  # the engine's own event starts runs too


async def test_marketing_send_to_an_unsubscribed_contact_is_skipped_and_missing_template_fails(api, sender):
    marketing = await make_template(api, "MARKETING")
    workflow = await make_workflow(api, [
        {"id": "m", "type": "send", "template": marketing, "next": "gone"},
        {"id": "gone", "type": "send", "template": "0190aaaa-0000-7000-8000-000000000000"},
    ], ["go"])
    await track_event(api, "ivy@example.org", "go")
    status, reply = await api.call("POST", "/v1/track", json={"email": "jim@example.org", "event": "go",
                                                              "subscribed": False})
    assert status == 200, reply
    await scheduler_for(api).run_until_idle()
    runs = {r.contact_id: r for r in await runs_of(api, workflow)}
    ivy, jim = runs[(await contact(api, "ivy@example.org")).id], runs[(await contact(api, "jim@example.org")).id]
    assert ivy.status == jim.status == "FAILED"
    assert ivy.history[-1]["reason"] == "template 0190aaaa-0000-7000-8000-000000000000 not found"
    assert ivy.emails_sent == 1 and jim.emails_sent == 0 and outcomes(jim)[0] == "skipped"
    assert [e.status for e in await emails_to(api, "ivy@example.org")] == ["QUEUED"]
    assert [e.status for e in await emails_to(api, "jim@example.org")] == ["SKIPPED"]
    stats = await api.db.read(admin.run_stats, workflow)
    assert stats["started"] == 2 and stats["failed"] == 2 and stats["emailsSent"] == 1


async def test_odd_stored_definitions_fail_the_run_without_stopping_the_scheduler(api, sender):
    bad = await make_workflow(api, [{"id": "a", "type": "teleport"}], ["odd"], name="bad")
    loop = await make_workflow(api, [{"id": "a", "type": "condition", "condition": {"bogus": 1}, "then": "a"}],
                               ["odd"], name="bad-condition")
    missing = await make_workflow(api, [{"id": "a", "type": "delay", "seconds": 0, "next": "nowhere"}], ["odd"],
                                  name="missing")
    good = await make_workflow(api, [{"id": "a", "type": "exit"}], ["odd"], name="good")
    await track_event(api, "kim@example.org", "odd")
    await scheduler_for(api).run_until_idle()
    assert (await one_run(api, bad)).history[-1]["reason"] == "step 'a' has an unknown type 'teleport'"
    assert (await one_run(api, loop)).status == "FAILED"
    assert (await one_run(api, missing)).history[-1]["reason"] == "step 'nowhere' is not in the workflow"
    assert (await one_run(api, good)).status == "EXITED"


async def test_a_run_started_by_email_sent_from_the_dispatcher(api, sender, tmp_path):
    workflow = await make_workflow(api, [{"id": "u", "type": "update", "data": {"mailed": True}}], ["email.sent"])
    status, reply = await api.call("POST", "/v1/send", json={"to": "lea@example.org", "subject": "Hello",
                                                             "body": "<p>Hi</p>"})
    assert status == 200, reply
    assert await runs_of(api, workflow) == []
    await dispatch_all(Dispatcher(api.db, FileTransport(tmp_path / "out"), TokenBucket(0), settings()))
    run = await one_run(api, workflow)
    assert run.context["transport"] == "file"
    await scheduler_for(api).run_until_idle()
    assert (await contact(api, "lea@example.org")).data == {"mailed": True}


async def test_an_event_in_a_rolled_back_transaction_starts_no_run(api, sender):
    workflow = await make_workflow(api, [{"id": "x", "type": "exit"}], ["doomed"])

    def work(session):
        track(session, api.project_id, "max@example.org", "doomed", None, {})
        assert session.execute(select(func.count()).select_from(WorkflowRun)).scalar_one() == 1
        raise RuntimeError("roll back")

    with pytest.raises(RuntimeError):
        await api.db.write(work)
    assert await runs_of(api, workflow) == []
    await track_event(api, "max@example.org", "doomed")
    assert len(await runs_of(api, workflow)) == 1


async def test_a_restart_during_a_delay_fires_once(api, sender):
    template = await make_template(api)
    workflow = await make_workflow(api, [{"id": "d", "type": "delay", "seconds": 1, "next": "m"},
                                         {"id": "m", "type": "send", "template": template}], ["later"])
    await track_event(api, "ned@example.org", "later")
    first = scheduler_for(api)
    task = asyncio.create_task(first.run())
    assert await wait_for(lambda: _delayed_at(api, workflow, "d"), 2)
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    second, third = scheduler_for(api), scheduler_for(api)
    tasks = [asyncio.create_task(second.run()), asyncio.create_task(third.run())]
    try:
        run = await wait_for(lambda: _ended(api, workflow), 4)
        await asyncio.sleep(0.5)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    assert run.status == "COMPLETED" and run.emails_sent == 1
    assert len(await emails_to(api, "ned@example.org")) == 1
    outbox = await api.db.read(lambda s: s.execute(select(func.count()).select_from(OutboxItem)).scalar_one())
    assert outbox == 1


async def test_webhook_posts_to_a_local_server_at_least_once(api, sender, aiohttp_server):
    received: list[dict] = []
    failures = {"left": 1}

    async def hook(request: web.Request) -> web.Response:
        received.append(await request.json())
        if failures["left"]:
            failures["left"] -= 1
            return web.Response(status=503)
        return web.json_response({"ok": True})

    app = web.Application()
    app.router.add_post("/hook", hook)
    server = await aiohttp_server(app, host="127.0.0.1")
    api.client.app[CONFIG].webhooks.allow_private_targets = True  # the receiver is on loopback
    url = f"http://127.0.0.1:{server.port}/hook"
    workflow = await make_workflow(api, [{"id": "h", "type": "webhook", "url": url, "next": "u"},
                                         {"id": "u", "type": "update", "data": {"hooked": True}}], ["ping"])
    event = await track_event(api, "oli@example.org", "ping", {"n": 1})
    scheduler = scheduler_for(api)
    await scheduler.run_until_idle()
    run = await one_run(api, workflow)
    assert len(received) == 1 and run.status == "ACTIVE" and run.step_id == "h"
    assert outcomes(run)[-1] == "webhook failed" and run.history[-1]["reason"] == "HTTP 503"
    await api.db.write(lambda s: store.postpone(s, [run.id], utcnow()))  # skip the backoff
    await scheduler.run_until_idle()
    run = await one_run(api, workflow)
    assert run.status == "COMPLETED" and outcomes(run)[-2:] == ["posted", "updated"], run.history
    assert len(received) == 2
    payload = received[-1]
    oli = await contact(api, "oli@example.org")
    assert payload == {"workflow": {"id": workflow, "name": "wf"}, "run": {"id": run.id},
                       "contact": {"id": oli.id, "email": "oli@example.org", "data": {"n": 1}},
                       "event": {"id": event["event"], "name": "ping", "data": {"n": 1}}}
    assert oli.data == {"n": 1, "hooked": True}


async def test_a_webhook_whose_outcome_was_lost_is_posted_again_after_its_lease(api, sender, aiohttp_server):
    received: list[dict] = []

    async def hook(request: web.Request) -> web.Response:
        received.append(await request.json())
        return web.Response(status=204)

    app = web.Application()
    app.router.add_post("/hook", hook)
    server = await aiohttp_server(app, host="127.0.0.1")
    api.client.app[CONFIG].webhooks.allow_private_targets = True  # the receiver is on loopback
    workflow = await make_workflow(api, [{"id": "h", "type": "webhook", "url": f"http://127.0.0.1:{server.port}/hook"}],
                                   ["ping"])
    await track_event(api, "pat@example.org", "ping")
    # the process dies after the commit that leased the run, before posting
    done = await api.db.write(lambda s: engine.run_due(s, utcnow(), 10, None, api.db.is_postgres))
    assert len(done.webhooks) == 1 and received == []
    run = await one_run(api, workflow)
    assert run.due_at >= utcnow() + timedelta(seconds=engine.WEBHOOK_LEASE_SECONDS - 5)
    await api.db.write(lambda s: store.postpone(s, [run.id], utcnow()))  # the lease runs out
    await scheduler_for(api).run_until_idle()
    assert len(received) == 1 and (await one_run(api, workflow)).status == "COMPLETED"
    # the old process's late outcome changes nothing
    assert await api.db.write(lambda s: engine.finish_webhook(s, done.webhooks[0], 200, None, utcnow())) is False


async def test_cancel_and_stats_and_start_run(api, sender):
    workflow = await make_workflow(api, [{"id": "d", "type": "delay", "minutes": 60, "next": "x"},
                                         {"id": "x", "type": "exit"}], ["x"])
    await track_event(api, "quinn@example.org", "x")
    await scheduler_for(api).run_until_idle()
    run = await one_run(api, workflow)
    await api.db.write(lambda s: admin.cancel_run(s, admin.get_run(s, workflow, run.id, True), utcnow(), "delay"))
    await scheduler_for(api).run_until_idle()
    quinn = await contact(api, "quinn@example.org")

    def start(session):
        return store.start_run(session, admin.get_workflow(session, api.project_id, workflow), quinn.id, utcnow(),
                               {"manual": True})

    assert await api.db.write(start) is not None
    stats = await api.db.read(admin.run_stats, workflow)
    assert stats["started"] == 2 and stats["cancelled"] == 1 and stats["active"] == 1


async def test_delay_until_a_moment(api, sender):
    """Three seconds ahead: time enough for the setup on a loaded machine, before the moment passes."""
    at = datetime.now(UTC) + timedelta(seconds=3)
    workflow = await make_workflow(api, [{"id": "d", "type": "delay", "until": at.isoformat(), "next": "x"},
                                         {"id": "x", "type": "exit"}], ["x"])
    await track_event(api, "rae@example.org", "x")
    await scheduler_for(api).run_until_idle()
    run = await one_run(api, workflow)
    assert (run.status, run.step_id) == ("WAITING", "d") and abs(run.due_at - at) < timedelta(milliseconds=1)
    await asyncio.sleep((at - datetime.now(UTC)).total_seconds() + 0.1)
    await scheduler_for(api).run_until_idle()
    assert (await one_run(api, workflow)).status == "EXITED"


async def test_a_run_an_older_plunkd_delayed_goes_on_from_the_next_step(api, sender):
    """Before runs WAITed at their delay step, a delayed run was stored ACTIVE at the step after it, due at
    the delay's end: such rows, left by an upgrade, still send once and complete."""
    template = await make_template(api)
    workflow = await make_workflow(api, [{"id": "d", "type": "delay", "minutes": 60, "next": "m"},
                                         {"id": "m", "type": "send", "template": template}], ["older"])
    await track_event(api, "old@example.org", "older")
    older = [{"step": "d", "type": "delay", "at": "2026-01-01T00:00:00.000Z", "outcome": "delayed",
              "until": "2026-01-01T01:00:00.000Z"}]
    await api.db.write(lambda s: s.execute(WorkflowRun.__table__.update().values(
        status="ACTIVE", step_id="m", due_at=utcnow(), history=older)))
    await scheduler_for(api).run_until_idle()
    run = await one_run(api, workflow)
    assert run.status == "COMPLETED" and outcomes(run) == ["delayed", "sent"] and run.emails_sent == 1
    assert len(await emails_to(api, "old@example.org")) == 1


async def test_a_workflow_written_here_fires_at_once_and_one_written_elsewhere_within_seconds(api, sender):
    await track_event(api, "sam@example.org", "late")  # caches "nothing listens" for the project
    here = await make_workflow(api, [{"id": "x", "type": "exit"}], ["late"])
    await track_event(api, "sam@example.org", "late")
    assert len(await runs_of(api, here)) == 1
    elsewhere = new_id()

    def write_elsewhere(session):  # as another process would: nothing tells this process's cache
        conn = session.connection()
        now = utcnow()
        conn.execute(Workflow.__table__.insert(), {
            "id": elsewhere, "project_id": api.project_id, "name": "elsewhere", "exclude_events": [],
            "definition": {"steps": [{"id": "x", "type": "exit"}]}, "enabled": True, "run_once": False,
            "kind": "WORKFLOW", "created_at": now, "updated_at": now})
        conn.execute(WorkflowTrigger.__table__.insert(), {"workflow_id": elsewhere, "event": "late",
                                                          "project_id": api.project_id})

    await api.db.write(write_elsewhere)
    await asyncio.sleep(store.INTEREST_TTL + 0.1)
    await track_event(api, "sam@example.org", "late")
    assert len(await runs_of(api, elsewhere)) == 1


async def test_a_group_of_runs_at_one_send_step_queues_one_email_each_with_its_own_event_data(api, sender, tmp_path):
    """Thirty runs reach the send step in one claim: they are sent as one group (one deferred content), each
    email composed at dispatch with its own run's trigger data; a contact deleted meanwhile fails its run alone,
    and a contact who is not subscribed gets a SKIPPED record for marketing mail."""
    template = await make_template(api, "MARKETING")
    workflow = await make_workflow(api, [
        {"id": "hold", "type": "delay", "seconds": 60, "next": "mail"},
        {"id": "mail", "type": "send", "template": template, "data": {"coupon": "C-{{plan}}"}},
    ], ["ordered"])
    addresses = [f"g{i:02d}@example.org" for i in range(30)]
    for index, address in enumerate(addresses):
        await track_event(api, address, "ordered", {"plan": f"p{index}"})
    status, reply = await api.call("POST", "/v1/track", json={"email": "quiet@example.org", "event": "ordered",
                                                              "subscribed": False, "data": {"plan": "q"}})
    assert status == 200, reply
    scheduler = scheduler_for(api)
    scheduler.parallel = 1  # one claim: on PostgreSQL two claim at once and may split the thirty between them
    await scheduler.run_until_idle()
    gone = await contact(api, addresses[0])
    status, _ = await api.call("DELETE", f"/contacts/{gone.id}")
    assert status == 200
    await api.db.write(lambda s: s.execute(WorkflowRun.__table__.update().values(due_at=utcnow())))
    await scheduler.run_until_idle()

    runs = await runs_of(api, workflow)
    assert len(runs) == 30  # the deleted contact's run went with it (ON DELETE CASCADE)
    by_contact = {r.contact_id: r for r in runs}
    quiet = by_contact.pop((await contact(api, "quiet@example.org")).id)
    assert outcomes(quiet) == ["waiting", "delayed", "skipped"] and quiet.emails_sent == 0
    assert all(outcomes(r) == ["waiting", "delayed", "sent"] and r.emails_sent == 1 for r in by_contact.values())
    queued = await api.db.read(lambda s: list(s.execute(select(Email).where(Email.source == "workflow")).scalars()))
    assert sorted(e.status for e in queued) == ["QUEUED"] * 29 + ["SKIPPED"]
    assert len({e.content_id for e in queued}) == 1
    folder = tmp_path / "out"
    await dispatch_all(dispatcher_for(api, folder))
    bodies = {}
    for path in folder.glob("*.eml"):
        message = email.message_from_bytes(path.read_bytes(), policy=policy.default)
        bodies[message["To"]] = message.get_body(("html",)).get_content()
    assert len(bodies) == 29
    for index, address in enumerate(addresses[1:], 1):
        assert f"Plan p{index}, coupon C-{{{{plan}}}}" in bodies[address]  # step data is not itself a template


async def test_a_group_condition_branches_each_run_on_its_own_contact(api, sender):
    workflow = await make_workflow(api, [
        {"id": "c", "type": "condition", "condition": {"field": "data.vip", "op": "equals", "value": True},
         "then": "yes", "else": "no"},
        {"id": "yes", "type": "update", "data": {"branch": "vip"}},
        {"id": "no", "type": "update", "data": {"branch": "regular"}},
    ], ["visit"])
    for index in range(12):
        await track_event(api, f"c{index}@example.org", "visit", {"vip": index % 3 == 0})
    await scheduler_for(api).run_until_idle()
    for index in range(12):
        found = await contact(api, f"c{index}@example.org")
        assert found.data["branch"] == ("vip" if index % 3 == 0 else "regular"), index
    assert {tuple(outcomes(r)) for r in await runs_of(api, workflow)} == {("then", "updated"), ("else", "updated")}


async def test_an_idle_scheduler_wakes_when_the_next_run_is_due_not_at_its_next_poll(api, sender):
    """The scheduler sleeps until the earliest due run; with only the 0.5 s poll, a step would run up to half
    a second late (three runs due at different offsets would all be on time by chance about 3 % of the time)."""
    workflow = await make_workflow(api, [{"id": "d", "type": "delay", "seconds": 1, "next": "x"},
                                         {"id": "x", "type": "exit"}], ["soon"])
    scheduler = WorkflowScheduler(api.db, None, lambda: None, poll_seconds=0.5)
    task = asyncio.create_task(scheduler.run())
    try:
        for index in range(3):
            await track_event(api, f"w{index}@example.org", "soon")
            scheduler.wake()
            await asyncio.sleep(0.17)
        assert await wait_for(lambda: _all_ended(api, workflow, 3), 4)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    for run in await runs_of(api, workflow):
        assert outcomes(run) == ["waiting", "delayed", "exit"], run.history
        fired = run.history[1]
        lateness = (datetime.fromisoformat(fired["at"]) - datetime.fromisoformat(fired["due"])).total_seconds()
        assert 0 <= lateness < 0.15, run.history


async def _all_ended(api, workflow: str, count: int):
    runs = await runs_of(api, workflow)
    return len(runs) == count and all(run.status not in store.LIVE for run in runs)
