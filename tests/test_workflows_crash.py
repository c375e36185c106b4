"""Workflow steps survive `kill -9` of the process running them: a real `plunkd serve` (SQLite file, the
scheduler in the dispatcher child) is killed in the middle of a burst of 2,000 send steps all due at the
same moment; the supervisor restarts the child, which finishes the burst, and every run sent its email
exactly once and completed."""

from __future__ import annotations

import asyncio
import os
import signal
import sqlite3
from datetime import timedelta

import pytest

from bench.campaign import seed_contacts
from storage.db import Database
from storage.models import Contact, Template, Workflow, WorkflowRun, WorkflowTrigger, new_id, utcnow
from tests.servers import served_plunkd
from tests.test_cli_and_config import project_with_domain
from tests.test_processes import dispatcher_child, wait_until

RUNS = 2_000


async def start_burst(url: str, project_id: str, due_in: float) -> str:
    """A template, a workflow (send → update) and one run per contact, all due at the same moment."""
    db = Database(url)
    now = utcnow()
    due = now + timedelta(seconds=due_in)

    def work(session) -> str:
        template = Template(project_id=project_id, name="t", subject="Hi {{name}}", body="<p>{{name}}</p>",
                            type="TRANSACTIONAL", style="HTML", created_at=now, updated_at=now)
        workflow = Workflow(project_id=project_id, name="burst", exclude_events=[], enabled=True, run_once=False,
                            kind="WORKFLOW", created_at=now, updated_at=now, definition={})
        session.add_all([template, workflow])
        session.flush()
        workflow.definition = {"steps": [{"id": "mail", "type": "send", "template": template.id, "next": "mark"},
                                         {"id": "mark", "type": "update", "data": {"mailed": True}}]}
        session.add(WorkflowTrigger(workflow_id=workflow.id, event="never", project_id=project_id))
        contacts = session.query(Contact.id).filter(Contact.project_id == project_id).all()
        rows = []
        for (contact_id,) in contacts:
            run_id = new_id()
            rows.append({"id": run_id, "workflow_id": workflow.id, "project_id": project_id, "contact_id": contact_id,
                         "status": "ACTIVE", "step_id": "mail", "due_at": due, "waiting_for": None,
                         "once_key": run_id, "trigger_event_id": None, "context": {}, "history": [],
                         "emails_sent": 0, "created_at": now, "updated_at": now})
        session.connection().execute(WorkflowRun.__table__.insert(), rows)
        return workflow.id

    try:
        return await db.write(work)
    finally:
        await db.dispose()


def progress(database: str, workflow_id: str) -> tuple[int, int]:
    """(runs past the send step, runs completed)."""
    with sqlite3.connect(database, timeout=30) as conn:
        return conn.execute("SELECT count(*) FILTER (WHERE emails_sent > 0), count(*) FILTER "
                            "(WHERE status = 'COMPLETED') FROM workflow_runs WHERE workflow_id = ?",
                            (workflow_id,)).fetchone()


@pytest.mark.long
def test_kill_9_mid_burst_runs_every_step_exactly_once(tmp_path):
    env = {"PLUNKD_SMTP_ENABLED": "false", "PLUNKD_DELIVERY_RATE_PER_SECOND": "1"}
    project_id = project_with_domain(tmp_path, "p", "news@example.com", env).id
    database = tmp_path / "data" / "plunkd.sqlite3"
    url = f"sqlite+aiosqlite:///{database}"
    asyncio.run(seed_contacts(url, project_id, RUNS))

    with served_plunkd(tmp_path, env) as server:
        proc = server.proc
        child = wait_until(lambda: dispatcher_child(proc), 30, "the dispatcher process")
        workflow_id = asyncio.run(start_burst(url, project_id, 1.0))
        wait_until(lambda: progress(str(database), workflow_id)[0] > 0, 30, "the burst to start")
        os.kill(child, signal.SIGKILL)
        sent_at_kill, _ = progress(str(database), workflow_id)
        assert 0 < sent_at_kill < RUNS, "the kill did not land mid-burst"
        wait_until(lambda: (pid := dispatcher_child(proc)) and pid != child, 30, "a new dispatcher process")
        wait_until(lambda: progress(str(database), workflow_id)[1] == RUNS, 60, "every run to complete")

    with sqlite3.connect(database) as conn:
        emails, contacts = conn.execute("SELECT count(*), count(DISTINCT contact_id) FROM emails "
                                        "WHERE source = 'workflow'").fetchone()
        runs = conn.execute("SELECT count(*), sum(emails_sent), min(emails_sent), max(emails_sent) FROM workflow_runs "
                            "WHERE workflow_id = ? AND status = 'COMPLETED'", (workflow_id,)).fetchone()
        sends = conn.execute("SELECT count(*) FROM workflow_runs, json_each(workflow_runs.history) AS h "
                             "WHERE json_extract(h.value, '$.outcome') = 'sent'").fetchone()[0]
        marked = conn.execute("SELECT count(*) FROM contacts WHERE json_extract(data, '$.mailed') = 1").fetchone()[0]
    assert emails == contacts == RUNS, (emails, contacts)
    assert runs == (RUNS, RUNS, 1, 1)
    assert sends == RUNS and marked == RUNS
    print(f"killed with {sent_at_kill} of {RUNS} sends done")
