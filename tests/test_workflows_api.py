"""The workflow API through the real app and database: /workflows and the legacy /actions (stored as
workflows), validation of the steps naming each step, the 409s that keep a template or an event name a
workflow uses, runs (rows written here directly; the engine has its own tests), cancel and stats."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import func, select

from pipeline.workflows.definitions import action_definition, events_used, templates_used
from storage import workflow_admin
from storage.models import Workflow, WorkflowRun, WorkflowTrigger, new_id
from tests.test_events import deleted_in_parts

MILLISECOND_TIME = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z")

TEMPLATE = {"name": "Welcome", "subject": "Hi {{name ?? friend}}", "body": "<p>Hello</p>"}


async def template(api, name: str = "Welcome", key: str | None = None) -> str:
    status, body = await api.call("POST", "/templates", key=key, json={**TEMPLATE, "name": name})
    assert status == 201, body
    return body["data"]["id"]


def steps(template_id: str) -> list[dict]:
    return [
        {"id": "wait-a-bit", "type": "delay", "minutes": 10, "next": "welcome"},
        {"id": "welcome", "type": "send", "template": template_id, "data": {"plan": "pro"}, "next": "is-pro"},
        {"id": "is-pro", "type": "condition", "condition": {"field": "data.plan", "op": "equals", "value": "pro"},
         "then": "wait-order", "else": "bye"},
        {"id": "wait-order", "type": "wait", "event": "ordered", "timeoutSeconds": 86400, "then": "tag",
         "timeout": "hook"},
        {"id": "tag", "type": "update", "data": {"customer": True}, "subscribed": True},
        {"id": "hook", "type": "webhook", "url": "https://hooks.example.com/x?y=1", "next": "bye"},
        {"id": "bye", "type": "exit"},
    ]


async def create(api, template_id: str, **fields) -> dict:
    payload = {"name": "Onboarding", "trigger": {"event": "signed-up"}, "steps": steps(template_id), **fields}
    status, body = await api.call("POST", "/workflows", json=payload)
    assert status == 201, body
    return body["data"]


async def invalid(api, step_list, method="POST", path="/workflows", **extra) -> list[tuple[str, str]]:
    payload = {"name": "x", "trigger": {"event": "e"}, "steps": step_list, **extra}
    status, body = await api.call(method, path, json=payload)
    assert status == 422, body
    assert body["error"]["code"] == "VALIDATION_ERROR"
    return [(e["field"], e["code"]) for e in body["error"]["errors"]]


async def contact(api, email: str = "ann@example.org") -> str:
    status, body = await api.call("POST", "/contacts", json={"email": email})
    assert status == 201, body
    return body["data"]["id"]


async def add_run(api, workflow_id: str, contact_id: str, status: str = "ACTIVE", step: str | None = "wait-a-bit",
                  emails: int = 0, **fields) -> str:
    def write(session) -> str:
        run_id = new_id()
        run = WorkflowRun(id=run_id, workflow_id=workflow_id, project_id=api.project_id, contact_id=contact_id,
                          status=status, step_id=step, due_at=datetime.now(UTC) + timedelta(minutes=10),
                          once_key=run_id,
                          context={}, history=[{"step": "wait-a-bit", "type": "delay",
                                                "at": "2025-01-01T00:00:00+00:00", "outcome": "waiting"}],
                          emails_sent=emails, **fields)
        session.add(run)
        session.flush()
        return run.id

    return await api.db.write(write)


# ---------------------------------------------------------------------------------------------------
# Workflows: CRUD.

async def test_workflow_crud_round_trip(api):
    template_id = await template(api)
    made = await create(api, template_id)
    assert made["name"] == "Onboarding" and made["trigger"] == {"event": "signed-up"}
    assert made["steps"] == steps(template_id) and made["enabled"] is True and made["allowReentry"] is True
    assert made["projectId"] == api.project_id

    status, body = await api.call("GET", f"/workflows/{made['id']}")
    assert status == 200 and body["data"] == made
    for prefix in ("/v1", "/api/v1"):
        status, body = await api.call("GET", f"{prefix}/workflows/{made['id']}")
        assert status == 200, body

    status, body = await api.call("PATCH", f"/workflows/{made['id']}", json={
        "name": "Renamed", "enabled": False, "allowReentry": False, "trigger": {"event": "contact.subscribed"},
        "steps": [{"id": "only", "type": "send", "template": template_id}]})
    assert status == 200, body
    updated = body["data"]
    assert (updated["name"], updated["enabled"], updated["allowReentry"]) == ("Renamed", False, False)
    assert updated["trigger"] == {"event": "contact.subscribed"} and len(updated["steps"]) == 1
    stored = await api.db.read(lambda s: (s.get(Workflow, made["id"]).run_once, s.scalars(
        select(WorkflowTrigger.event).where(WorkflowTrigger.workflow_id == made["id"])).all()))
    assert stored == (True, ["contact.subscribed"])

    status, body = await api.call("PATCH", f"/workflows/{made['id']}", json={"enabled": True})
    assert status == 200 and body["data"]["enabled"] is True and body["data"]["name"] == "Renamed"

    status, body = await api.call("DELETE", f"/workflows/{made['id']}")
    assert status == 200 and body["data"]["id"] == made["id"]
    status, body = await api.call("GET", f"/workflows/{made['id']}")
    assert status == 404 and body["error"]["code"] == "NOT_FOUND"
    status, body = await api.call("DELETE", f"/workflows/{made['id']}")
    assert status == 404


async def test_deleting_a_workflow_deletes_its_runs_a_part_at_a_time_and_other_writes_go_on_between(
        api, monkeypatch):
    """A workflow's runs went with it in the DELETE's one transaction: a workflow with 100,000 runs held every other
    write on SQLite's one writer until it committed. They go first, a thousand per transaction (ten here), the
    workflow looked up again in each: another project's DELETE is still 404 and deletes no run."""
    made = await create(api, await template(api))
    contact_id = await contact(api)
    for _ in range(25):
        await add_run(api, made["id"], contact_id)

    def runs(session) -> int:
        return session.execute(select(func.count()).select_from(WorkflowRun)
                               .where(WorkflowRun.workflow_id == made["id"])).scalar_one()

    deleted = await deleted_in_parts(api, monkeypatch, f"/workflows/{made['id']}", runs, workflow_admin, "delete_runs")
    assert deleted["id"] == made["id"]
    status, _ = await api.call("GET", f"/workflows/{made['id']}")
    assert status == 404


@pytest.mark.parametrize("event", ["contact.subscribed", "contact.unsubscribed", "segment.vip.entry",
                                   "segment.vip.exit", "email.open", "any name at all"])
async def test_any_event_name_triggers(api, event):
    template_id = await template(api)
    made = await create(api, template_id, trigger={"event": event})
    assert made["trigger"]["event"] == event


async def test_workflow_list_is_paginated_newest_first_and_per_project(api):
    template_id = await template(api)
    ids = [(await create(api, template_id, name=f"w{i}"))["id"] for i in range(5)]
    status, body = await api.call("GET", "/workflows?limit=2")
    assert status == 200, body
    page = body["data"]
    assert [w["id"] for w in page["items"]] == ids[::-1][:2] and page["hasMore"] and page["total"] == 5
    seen = [w["id"] for w in page["items"]]
    while page["hasMore"]:
        status, body = await api.call("GET", f"/workflows?limit=2&cursor={page['nextCursor']}")
        page = body["data"]
        seen += [w["id"] for w in page["items"]]
    assert seen == ids[::-1]
    status, body = await api.call("GET", "/api/v1/workflows")
    assert status == 200 and isinstance(body, list) and len(body) == 5

    # Another project sees none of them, and cannot touch them.
    _, other_sk, _ = await api.new_project()
    status, body = await api.call("GET", "/workflows", key=other_sk)
    assert status == 200 and body["data"]["total"] == 0
    for method, path in [("GET", f"/workflows/{ids[0]}"), ("DELETE", f"/workflows/{ids[0]}"),
                         ("GET", f"/workflows/{ids[0]}/runs"), ("GET", f"/workflows/{ids[0]}/stats")]:
        status, body = await api.call(method, path, key=other_sk)
        assert status == 404, (method, path, body)
    status, body = await api.call("PATCH", f"/workflows/{ids[0]}", key=other_sk, json={"name": "mine"})
    assert status == 404
    # ...nor use this project's templates.
    status, body = await api.call("POST", "/workflows", key=other_sk, json={
        "name": "x", "trigger": {"event": "e"}, "steps": [{"id": "s", "type": "send", "template": template_id}]})
    assert status == 422 and body["error"]["errors"][0] == {
        "field": "steps.0.template", "message": f"Template {template_id} not found", "code": "unknown_template"}


async def test_workflow_defaults_and_required_fields(api):
    template_id = await template(api)
    status, body = await api.call("POST", "/workflows", json={"name": "x", "trigger": {"event": "e"}})
    assert status == 422 and ("steps", "invalid_type") in [(e["field"], e["code"]) for e in body["error"]["errors"]]
    status, body = await api.call("POST", "/workflows", json={"name": "x", "steps": steps(template_id)})
    assert status == 422 and body["error"]["errors"][0]["field"] == "trigger"
    assert await invalid(api, [], ) == [("steps", "too_small")]
    for blank in ("", "   "):
        status, body = await api.call("POST", "/workflows", json={
            "name": "x", "trigger": {"event": blank}, "steps": steps(template_id)})
        assert status == 422 and body["error"]["errors"][0]["field"] == "trigger.event", body


# ---------------------------------------------------------------------------------------------------
# Validation: every error names its step.

async def test_validation_errors_name_the_step(api):
    template_id = await template(api)
    send = {"id": "s", "type": "send", "template": template_id}
    cases = [
        ([send, {"id": "b", "type": "teleport"}], ("steps.1.type", "unknown_step_type")),
        ([send, {"id": "b", "type": 3}], ("steps.1.type", "unknown_step_type")),
        ([{"type": "exit"}], ("steps.0.id", "required")),
        ([{"id": "bad id!", "type": "exit"}], ("steps.0.id", "invalid_string")),
        ([{"id": "x" * 65, "type": "exit"}], ("steps.0.id", "invalid_string")),
        ([{"id": "a"}], ("steps.0.type", "required")),
        (["not a step"], ("steps.0", "invalid_type")),
        ([{**send, "next": "nowhere"}], ("steps.0.next", "unknown_step")),
        ([{**send, "next": 5}], ("steps.0.next", "invalid_type")),
        ([{**send, "colour": "red"}], ("steps.0.colour", "unknown_key")),
        ([{"id": "a", "type": "exit", "next": "a"}], ("steps.0.next", "unknown_key")),
        ([send, {"id": "s", "type": "exit"}], ("steps.1.id", "duplicate_step")),
        ([{**send, "next": "e"}, {"id": "e", "type": "exit"}, {"id": "lost", "type": "exit"}],
         ("steps.2", "unreachable_step")),
        ([{"id": "d", "type": "delay", "minutes": 527041}], ("steps.0.minutes", "too_big")),
        ([{"id": "d", "type": "delay", "seconds": 366 * 86400 + 1}], ("steps.0.seconds", "too_big")),
        ([{"id": "d", "type": "delay", "minutes": 0}], ("steps.0.minutes", "too_small")),
        ([{"id": "d", "type": "delay", "minutes": 1.5}], ("steps.0.minutes", "invalid_type")),
        ([{"id": "d", "type": "delay", "minutes": True}], ("steps.0.minutes", "invalid_type")),
        ([{"id": "d", "type": "delay"}], ("steps.0", "invalid_delay")),
        ([{"id": "d", "type": "delay", "minutes": 1, "seconds": 1}], ("steps.0", "invalid_delay")),
        ([{"id": "d", "type": "delay", "until": (datetime.now(UTC) + timedelta(days=367)).isoformat()}],
         ("steps.0.until", "too_big")),
        ([{"id": "d", "type": "delay", "until": "2025-01-01T10:00:00"}], ("steps.0.until", "invalid_date")),
        ([{"id": "d", "type": "delay", "until": "tomorrow"}], ("steps.0.until", "invalid_date")),
        ([{"id": "s", "type": "send"}], ("steps.0.template", "required")),
        ([{"id": "s", "type": "send", "template": "no-such-template"}], ("steps.0.template", "unknown_template")),
        ([{**send, "data": [1]}], ("steps.0.data", "invalid_type")),
        ([{**send, "data": {"k": "x" * 70_000}}], ("steps.0.data", "too_big")),
        ([{"id": "c", "type": "condition"}], ("steps.0.condition", "required")),
        ([{"id": "c", "type": "condition", "condition": {"field": "data.x", "op": "bogus", "value": 1}}],
         ("steps.0.condition.op", "unknown_operator")),
        ([{"id": "c", "type": "condition", "condition": {"all": [{"event": "e", "op": "did", "atLeast": 0}]}}],
         ("steps.0.condition.all.0.atLeast", "too_small")),
        ([{"id": "w", "type": "wait", "timeoutSeconds": 60}], ("steps.0.event", "required")),
        ([{"id": "w", "type": "wait", "event": " ", "timeoutSeconds": 60}], ("steps.0.event", "too_small")),
        ([{"id": "w", "type": "wait", "event": "e"}], ("steps.0.timeoutSeconds", "required")),
        ([{"id": "w", "type": "wait", "event": "e", "timeoutSeconds": 366 * 86400 + 1}],
         ("steps.0.timeoutSeconds", "too_big")),
        ([{"id": "u", "type": "update", "subscribed": "yes"}], ("steps.0.subscribed", "invalid_type")),
        ([{"id": "h", "type": "webhook", "url": "ftp://example.com/x"}], ("steps.0.url", "invalid_url")),
        ([{"id": "h", "type": "webhook", "url": "javascript:alert(1)"}], ("steps.0.url", "invalid_url")),
        ([{"id": "h", "type": "webhook", "url": "file:///etc/passwd"}], ("steps.0.url", "invalid_url")),
        ([{"id": "h", "type": "webhook"}], ("steps.0.url", "required")),
        ([{"id": f"s{i}", "type": "exit"} for i in range(101)], ("steps", "too_big")),
    ]
    for step_list, expected in cases:
        errors = await invalid(api, step_list)
        assert expected in errors, (step_list, errors)
    assert not await api.db.read(lambda s: s.scalar(select(func.count()).select_from(Workflow)))


async def test_cycles_are_refused_at_the_edge_that_closes_them(api):
    template_id = await template(api)
    send = {"id": "s", "type": "send", "template": template_id}
    assert await invalid(api, [{**send, "next": "s"}]) == [("steps.0.next", "cycle")]
    loop = [{"id": "a", "type": "delay", "seconds": 5, "next": "b"}, {**send, "id": "b", "next": "c"},
            {"id": "c", "type": "condition", "condition": {"field": "subscribed", "op": "equals", "value": True},
             "then": "d", "else": "a"}, {"id": "d", "type": "exit"}]
    assert await invalid(api, loop) == [("steps.2.else", "cycle")]
    wait_loop = [{"id": "w", "type": "wait", "event": "e", "timeoutSeconds": 60, "then": "x", "timeout": "w"},
                 {"id": "x", "type": "exit"}]
    assert await invalid(api, wait_loop) == [("steps.0.timeout", "cycle")]
    # Two branches meeting again is no cycle.
    diamond = [{"id": "c", "type": "condition", "condition": {"all": []}, "then": "a", "else": "b"},
               {**send, "id": "a", "next": "z"}, {**send, "id": "b", "next": "z"}, {"id": "z", "type": "exit"}]
    status, body = await api.call("POST", "/workflows", json={"name": "d", "trigger": {"event": "e"},
                                                              "steps": diamond})
    assert status == 201, body


async def test_every_step_type_and_until_are_accepted(api):
    template_id = await template(api)
    until = (datetime.now(UTC) + timedelta(days=30)).replace(microsecond=0).isoformat().replace("+00:00", "Z")
    made = await create(api, template_id, steps=[
        {"id": "d", "type": "delay", "until": until, "next": "d2"},
        {"id": "d2", "type": "delay", "seconds": 5.0, "next": "welcome"},
        *steps(template_id)[1:], ])
    assert made["steps"][0]["until"] == until and made["steps"][1]["seconds"] == 5


async def test_patch_validates_and_names_the_step(api):
    template_id = await template(api)
    made = await create(api, template_id)
    errors = await invalid(api, [{"id": "a", "type": "send", "template": template_id, "next": "a"}], "PATCH",
                           f"/workflows/{made['id']}")
    assert errors == [("steps.0.next", "cycle")]
    status, body = await api.call("GET", f"/workflows/{made['id']}")
    assert body["data"]["steps"] == steps(template_id)


# ---------------------------------------------------------------------------------------------------
# Legacy actions.

async def test_action_crud_in_the_legacy_shape(api):
    template_id = await template(api)
    status, body = await api.call("POST", "/actions", json={
        "name": "Welcome", "events": ["signed-up", "invited"], "notevents": ["unsubscribed-app"], "delay": 30,
        "runOnce": True, "template": template_id})
    assert status == 201, body
    action = body["data"]
    assert {k: v for k, v in action.items() if k not in ("id", "createdAt", "updatedAt")} == {
        "name": "Welcome", "events": ["invited", "signed-up"], "notevents": ["unsubscribed-app"], "delay": 30,
        "runOnce": True, "template": template_id, "projectId": api.project_id}
    stored = await api.db.read(lambda s: s.get(Workflow, action["id"]))
    assert stored.kind == "ACTION" and stored.exclude_events == ["unsubscribed-app"] and stored.run_once
    assert stored.definition == action_definition(30, template_id)

    status, body = await api.call("GET", f"/actions/{action['id']}")
    assert status == 200 and body["data"] == action
    status, body = await api.call("GET", "/actions")
    assert status == 200 and body["data"]["total"] == 1 and body["data"]["items"][0] == action
    status, body = await api.call("GET", "/api/v1/actions")
    assert status == 200 and isinstance(body, list) and body[0]["id"] == action["id"]
    # An action is not a workflow: every /workflows route answers 404 for it, the same on every route
    # (issue 20.6: runs and stats answered there while the workflow itself was 404); its runs and stats
    # are under /actions.
    for method, path in [("GET", ""), ("PATCH", ""), ("DELETE", ""), ("GET", "/runs"), ("GET", "/stats"),
                         ("POST", "/runs/x/cancel")]:
        status, body = await api.call(method, f"/workflows/{action['id']}{path}",
                                      json={"name": "n"} if method == "PATCH" else None)
        assert (status, body["error"]["code"]) == (404, "NOT_FOUND"), (method, path)
    status, body = await api.call("GET", "/workflows")
    assert body["data"]["total"] == 0
    status, body = await api.call("GET", f"/actions/{action['id']}/stats")
    assert status == 200 and body["data"]["started"] == 0
    status, body = await api.call("GET", f"/actions/{action['id']}/runs")
    assert status == 200 and body["data"]["items"] == []
    status, body = await api.call("POST", f"/actions/{action['id']}/runs/x/cancel")
    assert (status, body["error"]["code"]) == (404, "NOT_FOUND")

    # Defaults: no delay (one send step), not run once, no notevents.
    status, body = await api.call("POST", "/actions", json={"name": "Now", "events": ["x"], "template": template_id})
    assert status == 201, body
    now = body["data"]
    assert (now["delay"], now["runOnce"], now["notevents"]) == (0, False, [])
    assert (await api.db.read(lambda s: s.get(Workflow, now["id"]))).definition == {
        "steps": [{"id": "send", "type": "send", "template": template_id}]}

    other_template = await template(api, "Other")
    status, body = await api.call("PUT", "/actions", json={"id": action["id"], "delay": 0, "events": ["z"],
                                                           "template": other_template, "runOnce": False})
    assert status == 200, body
    assert (body["data"]["delay"], body["data"]["events"], body["data"]["template"], body["data"]["runOnce"],
            body["data"]["name"], body["data"]["notevents"]) == (0, ["z"], other_template, False, "Welcome",
                                                                 ["unsubscribed-app"])
    status, body = await api.call("PUT", "/actions", json={"id": action["id"], "delay": 5})
    assert status == 200 and body["data"]["delay"] == 5 and body["data"]["template"] == other_template

    status, body = await api.call("DELETE", "/actions", json={"id": action["id"]})
    assert status == 200 and body["data"]["id"] == action["id"]
    status, body = await api.call("DELETE", f"/actions/{now['id']}")
    assert status == 200
    for method, path, payload in [("GET", f"/actions/{now['id']}", None),
                                  ("DELETE", "/actions", {"id": action["id"]}),
                                  ("PUT", "/actions", {"id": action["id"], "name": "x"})]:
        status, body = await api.call(method, path, json=payload)
        assert status == 404, (method, path, body)


async def test_an_actions_delay_can_go_while_runs_wait_in_it_and_their_emails_go_when_planned(api):
    """Runs WAIT at a delay step, and a workflow cannot drop a step runs sit at (409); Plunk's actions have
    no such rule, so setting an action's delay to 0 moves its delayed runs on to the send step, still due
    when their delay ends. Changing the minutes keeps them where they are."""
    template_id = await template(api)
    status, body = await api.call("POST", "/actions", json={"name": "Later", "events": ["joined"], "delay": 60,
                                                            "template": template_id})
    assert status == 201, body
    action_id = body["data"]["id"]
    delayed = await add_run(api, action_id, await contact(api), "WAITING", step="delay")
    due = (await api.db.read(lambda s: s.get(WorkflowRun, delayed))).due_at
    status, body = await api.call("PUT", "/actions", json={"id": action_id, "delay": 30})
    assert status == 200 and body["data"]["delay"] == 30, body
    run = await api.db.read(lambda s: s.get(WorkflowRun, delayed))
    assert (run.status, run.step_id, run.due_at) == ("WAITING", "delay", due)
    status, body = await api.call("PUT", "/actions", json={"id": action_id, "delay": 0})
    assert status == 200 and body["data"]["delay"] == 0, body
    run = await api.db.read(lambda s: s.get(WorkflowRun, delayed))
    assert (run.status, run.step_id, run.due_at) == ("ACTIVE", "send", due)
    status, body = await api.call("GET", f"/actions/{action_id}/stats")
    assert (body["data"]["active"], body["data"]["waiting"]) == (1, 0)


async def test_action_validation(api):
    template_id = await template(api)
    good = {"name": "a", "events": ["e"], "template": template_id}
    cases = [({**good, "template": "missing"}, ("template", "unknown_template")),
             ({**good, "events": []}, ("events", "too_small")),
             ({**good, "events": ["ok", " "]}, ("events.1", "too_small")),
             ({**good, "notevents": [""]}, ("notevents.0", "too_small")),
             ({**good, "delay": -1}, ("delay", "too_small")),
             ({**good, "delay": 527041}, ("delay", "too_big")),
             ({k: v for k, v in good.items() if k != "template"}, ("template", "invalid_type")),
             ({k: v for k, v in good.items() if k != "events"}, ("events", "invalid_type"))]
    for payload, expected in cases:
        status, body = await api.call("POST", "/actions", json=payload)
        assert status == 422, (payload, body)
        assert expected in [(e["field"], e["code"]) for e in body["error"]["errors"]], (payload, body)
    _, other_sk, _ = await api.new_project()
    status, body = await api.call("POST", "/actions", key=other_sk, json=good)
    assert status == 422 and body["error"]["errors"][0]["code"] == "unknown_template"


# ---------------------------------------------------------------------------------------------------
# What a workflow uses cannot be deleted.

async def test_a_template_a_workflow_or_action_sends_cannot_be_deleted(api):
    used_by_workflow, used_by_action, free = await template(api, "A"), await template(api, "B"), await template(
        api, "C")
    made = await create(api, used_by_workflow)
    status, body = await api.call("POST", "/actions", json={"name": "Act", "events": ["e"],
                                                            "template": used_by_action})
    action = body["data"]
    status, body = await api.call("DELETE", f"/templates/{used_by_workflow}")
    assert status == 409 and body["error"]["code"] == "CONFLICT", body
    assert f"workflow 'Onboarding' ({made['id']})" in body["error"]["message"]
    status, body = await api.call("DELETE", f"/templates/{used_by_action}")
    assert status == 409 and f"action 'Act' ({action['id']})" in body["error"]["message"], body
    status, _ = await api.call("DELETE", f"/templates/{free}")
    assert status == 200
    # Once the workflow no longer sends it, it may go.
    status, body = await api.call("PATCH", f"/workflows/{made['id']}", json={"steps": [{"id": "x", "type": "exit"}]})
    assert status == 200, body
    status, _ = await api.call("DELETE", f"/templates/{used_by_workflow}")
    assert status == 200


@pytest.mark.parametrize("use", ["trigger", "notevents", "wait", "condition"])
async def test_an_event_name_a_workflow_uses_cannot_be_deleted(api, use):
    template_id = await template(api)
    status, _ = await api.call("POST", "/v1/track", json={"event": "used-event", "email": "ann@example.org"})
    assert status == 200
    if use == "trigger":
        await create(api, template_id, trigger={"event": "used-event"})
    elif use == "notevents":
        status, body = await api.call("POST", "/actions", json={"name": "A", "events": ["other"],
                                                                "notevents": ["used-event"], "template": template_id})
        assert status == 201, body
    elif use == "wait":
        await create(api, template_id, steps=[{"id": "w", "type": "wait", "event": "used-event",
                                               "timeoutSeconds": 60}])
    else:
        await create(api, template_id, steps=[{"id": "c", "type": "condition", "condition": {
            "not": {"event": "used-event", "op": "didNot"}}}])
    status, body = await api.call("DELETE", "/events/used-event")
    assert status == 409 and body["error"]["code"] == "CONFLICT", body
    assert "used-event" in body["error"]["message"]
    status, body = await api.call("DELETE", "/events/unused-event")
    assert status == 404


def test_events_and_templates_used():
    definition = {"steps": [
        {"id": "w", "type": "wait", "event": "paid", "timeoutSeconds": 5, "then": "c"},
        {"id": "c", "type": "condition", "condition": {"any": [{"event": "clicked", "op": "did"},
                                                               {"field": "email", "op": "contains", "value": "x"}]},
         "then": "s"},
        {"id": "s", "type": "send", "template": "t1"}, {"id": "s2", "type": "send", "template": "t2"}]}
    assert events_used(definition) == {"paid", "clicked"}
    assert templates_used(definition) == {"t1", "t2"}
    assert action_definition(0, "t") == {"steps": [{"id": "send", "type": "send", "template": "t"}]}
    assert action_definition(5, "t")["steps"][0] == {"id": "delay", "type": "delay", "minutes": 5, "next": "send"}


# ---------------------------------------------------------------------------------------------------
# Runs, cancel, stats.

async def test_runs_listing_cancel_and_stats(api):
    template_id = await template(api)
    made = await create(api, template_id)
    people = [await contact(api, f"p{i}@example.org") for i in range(4)]
    statuses = ["ACTIVE", "WAITING", "COMPLETED", "EXITED", "CANCELLED", "FAILED", "COMPLETED"]
    run_ids = [await add_run(api, made["id"], people[i % 4], status, step="welcome" if status == "ACTIVE"
                             else "wait-order" if status == "WAITING" else None, emails=i % 2,
                             waiting_for="ordered" if status == "WAITING" else None)
               for i, status in enumerate(statuses)]

    status, body = await api.call("GET", f"/workflows/{made['id']}/runs?limit=3")
    assert status == 200, body
    page = body["data"]
    assert page["total"] == 7 and page["hasMore"] and [r["id"] for r in page["items"]] == run_ids[::-1][:3]
    seen = [r["id"] for r in page["items"]]
    while page["hasMore"]:
        status, body = await api.call("GET", f"/workflows/{made['id']}/runs?limit=3&cursor={page['nextCursor']}")
        page = body["data"]
        seen += [r["id"] for r in page["items"]]
    assert seen == run_ids[::-1]
    status, body = await api.call("GET", f"/workflows/{made['id']}/runs?limit=100")
    waiting = next(r for r in body["data"]["items"] if r["id"] == run_ids[1])
    assert (waiting["status"], waiting["position"], waiting["waitingFor"], waiting["workflowId"],
            waiting["contactId"]) == ("WAITING", "wait-order", "ordered", made["id"], people[1])
    assert waiting["dueAt"] and waiting["history"] == [
        {"step": "wait-a-bit", "type": "delay", "at": "2025-01-01T00:00:00+00:00", "outcome": "waiting"}]

    status, body = await api.call("GET", f"/workflows/{made['id']}/stats")
    assert status == 200 and body["data"] == {"started": 7, "active": 1, "waiting": 1, "completed": 2,
                                              "exited": 1, "cancelled": 1, "failed": 1, "emailsSent": 3}

    for run_id in run_ids[:2]:
        status, body = await api.call("POST", f"/workflows/{made['id']}/runs/{run_id}/cancel")
        assert status == 200, body
        assert body["data"]["status"] == "CANCELLED" and body["data"]["dueAt"] is None
        assert body["data"]["waitingFor"] is None and body["data"]["history"][-1]["outcome"] == "cancelled"
        assert MILLISECOND_TIME.fullmatch(body["data"]["history"][-1]["at"]), body["data"]["history"]
    for run_id in run_ids[2:]:
        status, body = await api.call("POST", f"/workflows/{made['id']}/runs/{run_id}/cancel")
        assert status == 409 and body["error"]["code"] == "CONFLICT", body
    status, body = await api.call("POST", f"/workflows/{made['id']}/runs/{run_ids[0]}/cancel")
    assert status == 409
    status, body = await api.call("POST", f"/workflows/{made['id']}/runs/{made['id']}/cancel")
    assert status == 404
    status, body = await api.call("GET", f"/workflows/{made['id']}/stats")
    assert body["data"]["cancelled"] == 3 and body["data"]["active"] == 0 and body["data"]["waiting"] == 0

    _, other_sk, _ = await api.new_project()
    status, _ = await api.call("POST", f"/workflows/{made['id']}/runs/{run_ids[2]}/cancel", key=other_sk)
    assert status == 404

    # Deleting the workflow deletes its runs.
    status, _ = await api.call("DELETE", f"/workflows/{made['id']}")
    assert status == 200
    assert await api.db.read(lambda s: s.scalar(select(func.count()).select_from(WorkflowRun))) == 0


async def test_changing_steps_under_live_runs(api):
    template_id = await template(api)
    made = await create(api, template_id)
    person = await contact(api)
    await add_run(api, made["id"], person, "WAITING", step="wait-order")
    await add_run(api, made["id"], person, "COMPLETED", step=None)
    # Dropping the step a live run waits in: 409; keeping it (same id and type) is fine.
    status, body = await api.call("PATCH", f"/workflows/{made['id']}", json={
        "steps": [{"id": "only", "type": "send", "template": template_id}]})
    assert status == 409 and "'wait-order'" in body["error"]["message"], body
    status, body = await api.call("PATCH", f"/workflows/{made['id']}", json={
        "steps": [{"id": "wait-order", "type": "send", "template": template_id}]})
    assert status == 409, body
    status, body = await api.call("PATCH", f"/workflows/{made['id']}", json={
        "steps": [{"id": "wait-order", "type": "wait", "event": "paid", "timeoutSeconds": 60}]})
    assert status == 200, body
    # Other changes never conflict.
    status, body = await api.call("PATCH", f"/workflows/{made['id']}", json={"name": "n", "enabled": False})
    assert status == 200


# ---------------------------------------------------------------------------------------------------
# The door.

async def test_auth_malformed_and_oversized(api):
    template_id = await template(api)
    made = await create(api, template_id)
    paths = [("GET", "/workflows"), ("POST", "/workflows"), ("GET", f"/workflows/{made['id']}"),
             ("PATCH", f"/workflows/{made['id']}"), ("DELETE", f"/workflows/{made['id']}"),
             ("GET", f"/workflows/{made['id']}/runs"), ("GET", f"/workflows/{made['id']}/stats"),
             ("POST", f"/workflows/{made['id']}/runs/x/cancel"), ("GET", "/actions"), ("POST", "/actions"),
             ("PUT", "/actions"), ("DELETE", "/actions"), ("GET", "/actions/x"), ("DELETE", "/actions/x")]
    for method, path in paths:
        resp = await api.client.request(method, path)
        assert resp.status == 401, (method, path)
        assert (await resp.json())["error"]["code"] == "UNAUTHORIZED"
        status, body = await api.call(method, path, key=api.pk)
        assert status == 403 and body["error"]["code"] == "FORBIDDEN", (method, path)
    for method, path in [("POST", "/workflows"), ("PATCH", f"/workflows/{made['id']}"), ("POST", "/actions"),
                         ("PUT", "/actions")]:
        status, body = await api.call(method, path, data=b'{"name": ', headers={"Content-Type": "application/json"})
        assert status == 400 and body["error"]["code"] == "BAD_REQUEST", (method, path)
    status, body = await api.call("POST", "/workflows", json=["x"])
    assert status == 422 and body["error"]["errors"][0]["field"] == "body"
    huge = {"name": "x", "trigger": {"event": "e"},
            "steps": [{"id": "s", "type": "send", "template": template_id, "data": {"k": "x" * (16 * 1024 * 1024)}}]}
    status, body = await api.call("POST", "/workflows", json=huge)
    assert status == 413 and body["error"]["code"] == "PAYLOAD_TOO_LARGE"
    status, body = await api.call("GET", "/workflows?limit=0")
    assert status == 422
    status, body = await api.call("POST", "/workflows", json={
        "name": "x\x00", "trigger": {"event": "e"}, "steps": [{"id": "s", "type": "exit"}]})
    assert status == 422 and body["error"]["errors"][0]["field"] == "name"
