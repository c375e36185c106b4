"""The dashboard's workflow pages through the real app and database: the list with legacy actions, the graph
(one box per step, one labelled arrow per branch, a text alternative), per-step counts from one query, a run
advancing through the real scheduler, the definition edited with errors shown at their step, enable/disable,
runs paged, hostile names escaped, and the role rules."""

from __future__ import annotations

import asyncio
import json
import re
from collections import Counter

from markupsafe import escape
from sqlalchemy import event

from dashboard.workflows import graph
from pipeline.workflows import rules
from storage import workflow_admin
from storage.models import WorkflowRun
from tests.test_dashboard_campaigns import statements
from tests.test_workflows_api import add_run, contact, create, steps, template
from tests.test_workflows_engine import make_template, one_run, scheduler_for, track_event, wait_for

HOSTILE = '"><img src=x onerror=alert(1)><script>alert(1)</script>'


async def run_with_history(api, workflow_id: str, contact_id: str, status: str, step: str,
                           history: list[dict]) -> str:
    run_id = await add_run(api, workflow_id, contact_id, status, step)

    def rewrite(session) -> None:
        session.get_one(WorkflowRun, run_id).history = history

    await api.db.write(rewrite)
    return run_id


def base(dash) -> str:
    return f"/projects/{dash.api.project_id}/workflows"


async def test_the_graph_has_a_box_per_step_and_a_labelled_arrow_per_branch(dash):
    workflow = await create(dash.api, await template(dash.api))
    status, html = await dash.owner.get(f"{base(dash)}/{workflow['id']}")
    assert status == 200
    svg = html[html.index('<svg class="chart workflow-graph" role="img"'):html.index("</svg>")]
    assert re.search(r"<title id=\"graph-title\">The workflow's 7 steps", svg)
    assert re.findall(r'data-step="([^"]+)"', svg) == [s["id"] for s in steps("t")]
    assert Counter(re.findall(r'<text class="edge-label"[^>]*>(\w+)</text>', svg)) == Counter(
        {"next": 3, "then": 2, "else": 1, "timeout": 1})
    assert len(re.findall(r'<path class="edge-path"', svg)) == 7
    alternative = " ".join(html[html.index('<ol class="step-list">'):].split())
    assert "<strong>is-pro</strong> (condition): then → wait-order, else → bye;" in alternative
    status, body = await dash.owner.get_json(f"{base(dash)}/{workflow['id']}")
    assert status == 200 and [s["id"] for s in body["data"]["definition"]] == [s["id"] for s in steps("t")]


async def test_step_counts_come_from_one_query_and_say_waiting_passed_failed(dash):
    workflow = await create(dash.api, await template(dash.api))
    page = f"{base(dash)}/{workflow['id']}"
    ann, bob, cy = [await contact(dash.api, f"{name}@example.org") for name in ("ann", "bob", "cy")]
    await run_with_history(dash.api, workflow["id"], ann, "ACTIVE", "welcome", [
        {"step": "wait-a-bit", "type": "delay", "at": "2026-01-01T00:00:00.000Z", "outcome": "delayed"}])
    await run_with_history(dash.api, workflow["id"], bob, "WAITING", "wait-order", [
        {"step": "wait-a-bit", "type": "delay", "at": "2026-01-01T00:00:00.000Z", "outcome": "delayed"},
        {"step": "welcome", "type": "send", "at": "2026-01-01T00:10:00.000Z", "outcome": "sent"},
        {"step": "is-pro", "type": "condition", "at": "2026-01-01T00:10:00.000Z", "outcome": "then"},
        {"step": "wait-order", "type": "wait", "at": "2026-01-01T00:10:00.000Z", "outcome": "waiting"}])
    await run_with_history(dash.api, workflow["id"], cy, "FAILED", "welcome", [
        {"step": "wait-a-bit", "type": "delay", "at": "2026-01-01T00:00:00.000Z", "outcome": "delayed"},
        {"step": "welcome", "type": "send", "at": "2026-01-01T00:10:00.000Z", "outcome": "failed"}])

    status, body = await dash.owner.get_json(page)
    counts = body["data"]["stepCounts"]
    assert counts["wait-a-bit"] == {"waiting": 0, "passed": 3, "failed": 0}
    assert counts["welcome"] == {"waiting": 1, "passed": 1, "failed": 1}
    assert counts["is-pro"] == {"waiting": 0, "passed": 1, "failed": 0}
    assert counts["wait-order"] == {"waiting": 1, "passed": 0, "failed": 0}
    assert counts["bye"] == {"waiting": 0, "passed": 0, "failed": 0}
    workflow_json = body["data"]["workflow"]
    assert (workflow_json["liveRuns"], workflow_json["runs"]) == (2, 3), "from the statement of the step counts"
    status, html = await dash.owner.get(page)
    assert "1 waiting · 1 passed · 1 failed" in html

    with statements(dash.api.db) as seen:
        await dash.api.db.read(rules.workflow_counts, workflow["id"])
    assert len(seen) == 1


async def test_the_runs_histories_are_read_again_only_when_a_run_changed(dash):
    """What bench.dashboard found: the passed counts read every run's history (5,000 runs: 40 ms of CPU per
    page load on SQLite); they are kept while the workflow's runs stay as they were, and read afresh,
    right, when one moves, starts or is deleted."""
    workflow = await create(dash.api, await template(dash.api))
    page = f"{base(dash)}/{workflow['id']}"
    ann, bob = [await contact(dash.api, f"{name}@example.org") for name in ("ann", "bob")]
    delayed = {"step": "wait-a-bit", "type": "delay", "at": "2026-01-01T00:00:00.000Z", "outcome": "delayed"}
    sent = {"step": "welcome", "type": "send", "at": "2026-01-01T00:10:00.000Z", "outcome": "sent"}
    ann_run = await run_with_history(dash.api, workflow["id"], ann, "ACTIVE", "welcome", [delayed])

    async def passed_and_history_reads() -> tuple[dict[str, int], int]:
        with statements(dash.api.db) as seen:
            status, body = await dash.owner.get_json(page)
        assert status == 200
        counts = body["data"]["stepCounts"]
        return ({step: c["passed"] for step, c in counts.items() if c["passed"]},
                sum("json_each" in sql or "json_array_elements" in sql for sql in seen))

    assert await passed_and_history_reads() == ({"wait-a-bit": 1}, 1)
    assert await passed_and_history_reads() == ({"wait-a-bit": 1}, 0)

    def moved_on(session) -> None:
        run = session.get_one(WorkflowRun, ann_run)
        run.step_id, run.history = "is-pro", [delayed, sent]

    await dash.api.db.write(moved_on)
    assert await passed_and_history_reads() == ({"wait-a-bit": 1, "welcome": 1}, 1)
    bob_run = await run_with_history(dash.api, workflow["id"], bob, "ACTIVE", "welcome", [delayed])
    assert await passed_and_history_reads() == ({"wait-a-bit": 2, "welcome": 1}, 1)
    assert await passed_and_history_reads() == ({"wait-a-bit": 2, "welcome": 1}, 0)
    await dash.api.db.write(lambda s: s.delete(s.get_one(WorkflowRun, bob_run)))
    carol = await contact(dash.api, "carol@example.org")
    await run_with_history(dash.api, workflow["id"], carol, "ACTIVE", "wait-a-bit", [])
    assert await passed_and_history_reads() == ({"wait-a-bit": 1, "welcome": 1}, 1)
    await dash.api.db.write(lambda s: s.delete(s.get_one(WorkflowRun, ann_run)))
    assert await passed_and_history_reads() == ({}, 1)


async def test_a_run_triggered_by_track_advances_on_the_graph(dash, sender):
    template_id = await make_template(dash.api, "MARKETING")
    status, html = await dash.owner.get(f"{base(dash)}/new")
    assert status == 200 and f"&#34;template&#34;: &#34;{template_id}&#34;" in html  # the newest template
    response = await dash.owner.post(base(dash), {"name": "Welcome", "trigger": "signed-up", "enabled": "true",
                                                  "steps": json.dumps([
                                                      {"id": "pause", "type": "delay", "seconds": 1, "next": "mail"},
                                                      {"id": "mail", "type": "send", "template": template_id}])})
    assert response.status == 303, await response.text()
    page = response.headers["Location"]
    body = {"data": {"id": page.rsplit("/", 1)[1]}}
    await track_event(dash.api, "new@example.org", "signed-up", {"plan": "pro"})
    scheduler = scheduler_for(dash.api)
    task = asyncio.create_task(scheduler.run())
    try:
        async def counts():
            return (await dash.owner.get_json(page))[1]["data"]["stepCounts"]

        assert await wait_for(lambda: _is(counts, "pause", {"waiting": 0, "passed": 1, "failed": 0}))
        assert await wait_for(lambda: _is(counts, "mail", {"waiting": 0, "passed": 1, "failed": 0}), seconds=10)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    run = await one_run(dash.api, body["data"]["id"])
    assert run.status == "COMPLETED"
    status, html = await dash.owner.get(page)
    assert "COMPLETED" in html and f'/projects/{dash.api.project_id}/contacts/{run.contact_id}"' in html


async def _is(counts, step: str, expected: dict) -> bool:
    return (await counts()).get(step) == expected


async def test_edit_shows_the_grammars_errors_at_the_step_they_name_and_saves_a_valid_one(dash):
    template_id = await template(dash.api)
    workflow = await create(dash.api, template_id)
    page = f"{base(dash)}/{workflow['id']}"
    await dash.owner.get(page)
    broken = [{"id": "first", "type": "exit"}, {"id": "later", "type": "delay", "seconds": 5, "next": "nowhere"}]
    form = {"name": "Onboarding", "trigger": "signed-up", "steps": json.dumps(broken)}
    response = await dash.owner.post(f"{page}/edit", form)
    assert response.status == 422
    html = await response.text()
    item = html[html.index('<li id="step-1">'):html.index("</li>", html.index('<li id="step-1">'))]
    assert "<strong>later</strong>" in item  # the steps as submitted are drawn, the error at its step
    assert '<p class="field-error">steps.1.next: No step has the id' in item
    assert '<g class="step step-delay has-error" data-step="later">' in html
    assert "not saved" in html and "nowhere" in html[html.index('<textarea id="wf-steps"'):]
    status, body = await dash.owner.post_json(f"{page}/edit", form)
    assert status == 422 and [e["field"] for e in body["error"]["errors"]] == ["steps.1.next"]

    for bad, field in ((form | {"steps": "[{"}, "steps"), (form | {"steps": '"text"'}, "steps"),
                       (form | {"steps": "[" * 100_000}, "steps"), (form | {"steps": " " * 1_200_000}, "steps"),
                       (form | {"name": ""}, "name"), (form | {"trigger": " "}, "trigger.event")):
        status, body = await dash.owner.post_json(f"{page}/edit", bad)
        assert status == 422 and field in [e["field"] for e in body["error"]["errors"]], (field, body)
    status, body = await dash.api.call("GET", f"/workflows/{workflow['id']}")
    assert body["data"]["steps"] == workflow["steps"]

    fixed = [{"id": "only", "type": "send", "template": template_id}]
    response = await dash.owner.post(f"{page}/edit", {"name": "Renamed", "trigger": "joined",
                                                      "steps": json.dumps({"steps": fixed})})
    assert response.status == 303
    status, body = await dash.api.call("GET", f"/workflows/{workflow['id']}")
    assert (body["data"]["name"], body["data"]["trigger"]["event"], body["data"]["steps"]) == (
        "Renamed", "joined", fixed)


async def test_enable_and_disable(dash):
    workflow = await create(dash.api, await template(dash.api))
    page = f"{base(dash)}/{workflow['id']}"
    status, html = await dash.owner.get(page)
    assert "Disable workflow" in html
    assert (await dash.owner.post(f"{page}/enabled", {"enabled": "false"})).status == 303
    status, body = await dash.api.call("GET", f"/workflows/{workflow['id']}")
    assert body["data"]["enabled"] is False
    status, html = await dash.owner.get(page)
    assert "Enable workflow" in html
    assert (await dash.owner.post(f"{page}/enabled", {"enabled": "maybe"})).status == 422


async def test_list_shows_workflows_with_run_counts_and_legacy_actions(dash):
    template_id = await template(dash.api)
    workflow = await create(dash.api, template_id)
    await add_run(dash.api, workflow["id"], await contact(dash.api))
    status, body = await dash.api.call("POST", "/actions", json={"name": "Old welcome", "events": ["joined"],
                                                                 "delay": 5, "template": template_id})
    assert status == 201, body
    action_id = body["data"]["id"]
    status, data = await dash.owner.get_json(base(dash))
    assert [(w["name"], w["enabled"], w["runs"], w["liveRuns"]) for w in data["data"]["workflows"]] == [
        ("Onboarding", True, 1, 1)]
    assert [(a["name"], a["triggers"], a["delay"], a["template"]) for a in data["data"]["actions"]] == [
        ("Old welcome", ["joined"], 5, template_id)]
    status, html = await dash.owner.get(f"{base(dash)}/{action_id}")
    assert status == 200 and html.count('<g class="step ') == 2 and "Save workflow" not in html
    assert (await dash.owner.post(f"{base(dash)}/{action_id}/enabled", {"enabled": "false"})).status == 404
    for query in ("cursor=nope", "cursor=" + "a" * 5000):
        assert (await dash.owner.get_json(f"{base(dash)}?{query}"))[0] == 422
        assert (await dash.owner.get_json(f"{base(dash)}/{workflow['id']}?{query}"))[0] == 422


async def test_runs_are_cursor_paged_newest_first(dash):
    workflow = await create(dash.api, await template(dash.api))
    run_ids = [await add_run(dash.api, workflow["id"], await contact(dash.api, f"r{i}@example.org"))
               for i in range(3)]
    from dashboard import workflows as pages
    size, pages.RUNS_PAGE_SIZE = pages.RUNS_PAGE_SIZE, 2
    try:
        status, first = await dash.owner.get_json(f"{base(dash)}/{workflow['id']}")
        status, second = await dash.owner.get_json(
            f"{base(dash)}/{workflow['id']}?cursor={first['data']['nextCursor']}")
    finally:
        pages.RUNS_PAGE_SIZE = size
    assert [r["id"] for r in first["data"]["runs"] + second["data"]["runs"]] == run_ids[::-1]
    assert first["data"]["runs"][0]["position"] == "wait-a-bit" and first["data"]["runs"][0]["history"]


async def test_hostile_names_and_events_come_back_escaped(dash):
    workflow = await create(dash.api, await template(dash.api), name=HOSTILE, trigger={"event": HOSTILE}, steps=[
        {"id": "hold", "type": "wait", "event": HOSTILE, "timeoutSeconds": 60}])
    for path in (base(dash), f"{base(dash)}/{workflow['id']}"):
        status, html = await dash.owner.get(path)
        assert status == 200
        assert "<script>alert(1)" not in html and "<img src=x" not in html
        assert str(escape(HOSTILE)) in html


async def test_a_send_step_shows_its_templates_name_escaped(dash):
    """The graph named a send step's template by its id (a UUID cut short); it shows the name the user gave
    it, escaped, and the id only for a template that is gone."""
    template_id = await template(dash.api, name="<b>Hi</b> & welcome")
    workflow = await create(dash.api, template_id)
    status, html = await dash.owner.get(f"{base(dash)}/{workflow['id']}")
    assert status == 200 and "<b>Hi</b>" not in html
    box = html[html.index('data-step="welcome"'):]
    assert '<text class="step-detail"' in box and "send &lt;b&gt;Hi&lt;/b&gt; &amp; welcome" in box[:600]
    assert f"send template {template_id[:10]}" not in html
    assert graph(steps(template_id), {})["boxes"][1]["detail"].startswith("send template "), "no name: the id"


async def test_a_viewer_sees_no_buttons_and_gets_403_an_editor_may_change(dash):
    workflow = await create(dash.api, await template(dash.api))
    page = f"{base(dash)}/{workflow['id']}"
    viewer = await dash.browser("viewer@example.com", "viewer")
    status, html = await viewer.get(page)
    assert status == 200 and "Save workflow" not in html and "Disable workflow" not in html
    assert (await viewer.post(f"{page}/enabled", {"enabled": "false"})).status == 403
    assert (await viewer.post(f"{page}/edit", {"name": "x", "trigger": "y", "steps": "[]"})).status == 403
    status, body = await dash.api.call("GET", f"/workflows/{workflow['id']}")
    assert body["data"]["enabled"] is True and body["data"]["name"] == "Onboarding"
    editor = await dash.browser("editor@example.com", "editor")
    await editor.get(page)
    assert (await editor.post(f"{page}/enabled", {"enabled": "false"})).status == 303
    status, body = await dash.api.call("GET", f"/workflows/{workflow['id']}")
    assert body["data"]["enabled"] is False


async def test_create_from_the_form_refuses_bad_definitions_and_stores_nothing(dash):
    template_id = await template(dash.api)
    editor = await dash.browser("editor@example.com", "editor")
    status, html = await editor.get(f"{base(dash)}/new")
    assert status == 200
    bad = {"name": HOSTILE, "trigger": "joined", "steps": json.dumps([{"id": "x", "type": "teleport"}])}
    response = await editor.post(base(dash), bad)
    assert response.status == 422
    html = await response.text()
    assert "steps.0.type" in html and "<script>alert(1)" not in html
    status, body = await editor.post_json(base(dash), bad)
    assert status == 422 and body["error"]["errors"][0]["field"] == "steps.0.type"
    status, body = await dash.api.call("GET", "/workflows")
    assert body["data"]["items"] == []
    status, body = await editor.post_json(base(dash), {"name": "Fine", "trigger": "joined", "enabled": "false",
                                                       "steps": json.dumps([{"id": "m", "type": "send",
                                                                             "template": template_id}])})
    assert status == 201
    status, created = await dash.api.call("GET", f"/workflows/{body['data']['id']}")
    assert (created["data"]["name"], created["data"]["enabled"]) == ("Fine", False)
    viewer = await dash.browser("viewer@example.com", "viewer")
    status, html = await viewer.get(base(dash))
    assert "New workflow" not in html
    assert (await viewer.get(f"{base(dash)}/new"))[0] == 403
    assert (await viewer.post(base(dash), bad | {"name": "x"})).status == 403


async def test_the_run_counts_of_the_list_and_the_graph_are_read_from_an_index_alone(dash):
    """What bench.dashboard found (5,000 runs): the list's run counts and the graph's waiting/failed counts
    read every run's row; they come from (workflow_id, status, step_id) and (workflow_id, updated_at). SQLite's
    plan names the covering index; PostgreSQL's, with sequential scans off so that a missing index shows,
    the index (whether it reads the heap too depends on VACUUM)."""
    postgres = dash.api.db.is_postgres
    workflow = await create(dash.api, await template(dash.api))
    ran: list[tuple[str, tuple]] = []

    def read(session) -> list[str]:
        connection = session.connection()

        def record(conn, cursor, statement, parameters, context, executemany):
            if conn is connection:  # the engine's other connections (the app's background loops) run meanwhile
                ran.append((statement, parameters))

        event.listen(session.get_bind(), "before_cursor_execute", record)
        try:
            workflow_admin.run_counts(session, [workflow["id"]])
            workflow_admin.step_positions(session, workflow["id"])
        finally:
            event.remove(session.get_bind(), "before_cursor_execute", record)
        if postgres:
            connection.exec_driver_sql("SET LOCAL enable_seqscan = off")
        explain = "EXPLAIN " if postgres else "EXPLAIN QUERY PLAN "
        return ["\n".join(str(row[-1]) for row in connection.exec_driver_sql(explain + sql, params))
                for sql, params in ran]

    counts_plan, positions_plan = await dash.api.db.read(read)
    if postgres:  # which of the two indexes it takes for the count and max(updated_at) depends on its statistics
        assert "Seq Scan" not in counts_plan + positions_plan, counts_plan + positions_plan
        assert "ix_workflow_runs_workflow_id_status_step_id" in counts_plan, counts_plan
        assert positions_plan.count(" ix_workflow_runs_workflow_id_") == 2, positions_plan  # each part by an index
        return
    assert "USING COVERING INDEX ix_workflow_runs_workflow_id_status_step_id" in counts_plan, counts_plan
    assert "USING COVERING INDEX ix_workflow_runs_workflow_id_status_step_id" in positions_plan, positions_plan
    assert "USING COVERING INDEX ix_workflow_runs_workflow_id_updated_at" in positions_plan, positions_plan
