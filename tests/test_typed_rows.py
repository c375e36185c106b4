"""Wide rows (a claimed outbox email, a workflow run) are built by column name, not by position: each field
comes from the column of its name, and a field the query does not select fails at once."""

from __future__ import annotations

import dataclasses

import pytest
from sqlalchemy import Table

from pipeline.projects import create_project
from storage import emails as email_store
from storage import workflows as run_store
from storage.emails import Claimed
from storage.models import Base, Contact, RunStatus, Workflow, utcnow
from storage.workflows import RunRecord


async def test_a_claimed_email_carries_each_field_from_its_own_column(db):
    issued = await db.write(lambda s: create_project(s, "rows", "shop@rows.example", "Rows"))
    project_id = issued.project.id

    def queue(session) -> str:
        content_id = email_store.insert_content(session, project_id, b"Subject: hi\r\n\r\nhi")
        return email_store.insert_email(session, project_id, None, content_id, "ann@example.org",
                                        "shop@rows.example", "hi", "api", envelope_sender="bounce@rows.example",
                                        variables={"plan": "pro"}, track_opens=False, track_clicks=True)

    email_id = await db.write(queue)
    claimed = await db.write(lambda s: email_store.claim_due(s, "worker", 10, 60, db.is_postgres))
    assert len(claimed) == 1
    item = claimed[0]
    assert (item.email_id, item.project_id, item.contact_id, item.attempts) == (email_id, project_id, None, 0)
    assert (item.recipient, item.sender, item.envelope_sender) == ("ann@example.org", "shop@rows.example",
                                                                   "bounce@rows.example")
    assert item.raw == b"Subject: hi\r\n\r\nhi" and item.content_id and item.outbox_id != email_id
    assert (item.suppressed, item.deferred, item.variables) == (False, False, {"plan": "pro"})
    assert (item.track_opens, item.track_clicks) == (False, True)


def test_claimed_is_built_by_name_only():
    values = {field.name: None for field in dataclasses.fields(Claimed)}
    assert Claimed(**values).outbox_id is None
    with pytest.raises(TypeError):
        Claimed(*values.values())  # by position: refused
    del values["track_clicks"]
    with pytest.raises(TypeError, match="track_clicks"):
        Claimed(**values)  # a field the query forgot: refused, not defaulted


async def test_a_run_record_carries_each_field_from_its_own_column(db):
    issued = await db.write(lambda s: create_project(s, "runs", "shop@runs.example", "Runs"))
    project_id = issued.project.id
    now = utcnow()

    def start(session) -> tuple[str, str]:
        contact = Contact(project_id=project_id, email="ann@example.org", subscribed=True, data={})
        workflow = Workflow(project_id=project_id, name="Welcome", run_once=False,
                            definition={"steps": [{"id": "first", "type": "wait", "seconds": 60}]})
        session.add_all([contact, workflow])
        session.flush()
        run_id = run_store.start_run(session, workflow, contact.id, now, context={"source": "test"})
        assert run_id is not None
        return run_id, workflow.id

    run_id, workflow_id = await db.write(start)
    record = await db.read(run_store.get_run_record, run_id)
    assert isinstance(record, RunRecord)
    assert (record.id, record.workflow_id, record.project_id, record.status) == (run_id, workflow_id, project_id,
                                                                                 RunStatus.ACTIVE)
    assert (record.step_id, record.waiting_for, record.trigger_event_id) == ("first", None, None)
    assert (record.context, record.history, record.emails_sent) == ({"source": "test"}, [], 0)
    assert record.due_at is not None and record.created_at is not None


def test_every_model_is_mapped_to_a_table():
    """What storage.models.Base tells the type checker about `__table__` (it can be any FromClause)."""
    mappers = list(Base.registry.mappers)
    assert len(mappers) > 10
    for mapper in mappers:
        assert isinstance(mapper.class_.__table__, Table), mapper.class_.__name__
