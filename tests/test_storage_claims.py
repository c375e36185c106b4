"""Claiming due rows (`storage.claims.DueClaim`, used by the outbox, webhook deliveries and workflow runs) on the
real database (SQLite, or PostgreSQL with PLUNKD_TEST_DATABASE_URL): due rows only, longest due first, several
selects merged and cut to the limit, the lease written with the claim; on PostgreSQL two workers claiming at
the same moment take disjoint rows without waiting for each other."""

from __future__ import annotations

import asyncio
from datetime import timedelta

import pytest
from sqlalchemy import select

from storage import contacts as contact_store
from storage import webhooks as webhook_store
from storage import workflow_admin
from storage import workflows as workflow_store
from storage.claims import DueClaim
from storage.models import WebhookDelivery, WorkflowRun, new_id, utcnow

DELIVERIES = WebhookDelivery.__table__
RUNS = WorkflowRun.__table__
LEASE = 30.0


async def seed_deliveries(api, offsets: list[float]) -> dict[str, float]:
    """A delivery per offset (seconds from now to its due time), named by its offset; returns name → offset."""
    now = utcnow()

    def work(session):
        endpoint = webhook_store.insert_endpoint(session, api.project_id, "https://hooks.example.com/in", ["*"],
                                                 "whsec_test", True)
        for offset in offsets:
            due = now + timedelta(seconds=offset)
            session.connection().execute(DELIVERIES.insert(), {
                "id": new_id(), "endpoint_id": endpoint.id, "event_id": None, "event_name": f"at{offset:g}",
                "payload": {}, "status": "PENDING", "attempts": 0, "due_at": due, "claimed_by": None,
                "attempt_log": [], "created_at": now, "updated_at": now})

    await api.db.write(work)
    return {f"at{offset:g}": offset for offset in offsets}


def claim_deliveries(limit: int, postgres: bool, at=None):
    """The claimed deliveries' names (in the order the sender posts them: oldest created first)."""
    def work(session):
        claimed = webhook_store.claim_due(session, at or utcnow(), limit, LEASE, postgres)
        return [delivery.event_name for delivery in claimed]
    return work


async def test_deliveries_are_claimed_longest_due_first_and_leased(api):
    await seed_deliveries(api, [-2, -4, 60, -3])
    postgres = api.db.is_postgres
    assert set(await api.db.write(claim_deliveries(2, postgres))) == {"at-4", "at-3"}, "the two longest due"
    rows = await api.db.read(lambda s: {row.event_name: row for row in s.execute(select(DELIVERIES)).all()})
    assert rows["at-4"].claimed_by is not None and rows["at-4"].claimed_by == rows["at-3"].claimed_by
    assert rows["at-4"].due_at > utcnow() + timedelta(seconds=LEASE - 5), "leased"
    assert rows["at-2"].claimed_by is None
    assert await api.db.write(claim_deliveries(10, postgres)) == ["at-2"], "the leased and the future are not due"
    later = utcnow() + timedelta(seconds=LEASE + 1)
    assert set(await api.db.write(claim_deliveries(10, postgres, later))) == {"at-2", "at-3", "at-4"}, \
        "due again when the lease runs out"


async def test_runs_of_both_live_statuses_are_merged_earliest_first_and_cut_to_the_limit(api):
    now = utcnow()

    def work(session):
        contact = contact_store.insert_contact(session, api.project_id, "run@example.com", True, {})
        workflow = workflow_admin.insert_workflow(session, api.project_id, {
            "name": "wf", "exclude_events": [], "enabled": True, "run_once": False, "kind": "WORKFLOW",
            "definition": {"steps": [{"id": "pause", "type": "delay", "seconds": 60}]}}, [])
        for status, offset in (("ACTIVE", -3), ("ACTIVE", -1), ("ACTIVE", 60), ("WAITING", -2), ("WAITING", -4),
                               ("COMPLETED", -9)):
            run_id = new_id()
            session.connection().execute(RUNS.insert(), {
                "id": run_id, "workflow_id": workflow.id, "project_id": api.project_id, "contact_id": contact.id,
                "status": status, "step_id": "pause", "due_at": now + timedelta(seconds=offset),
                "waiting_for": "x" if status == "WAITING" else None, "once_key": run_id, "trigger_event_id": None,
                "context": {"offset": offset}, "history": [], "emails_sent": 0, "created_at": now,
                "updated_at": now})

    await api.db.write(work)
    claimed = await api.db.write(lambda s: workflow_store.claim_due(s, utcnow(), 3, api.db.is_postgres))
    assert [(run.status, run.context["offset"]) for run in claimed] == [("WAITING", -4), ("ACTIVE", -3),
                                                                       ("WAITING", -2)]


def test_several_selects_need_a_merge_order():
    due = select(DELIVERIES.c.id).limit(1)
    with pytest.raises(ValueError, match="merge_key"):
        DueClaim(due, due)


@pytest.mark.postgres_only  # SQLite has one writer: a second claim waits for the first transaction
async def test_two_workers_claiming_at_once_take_disjoint_rows_without_waiting(api):
    names = await seed_deliveries(api, [-5, -4, -3, -2])
    async with api.db.session() as first, api.db.session() as second:
        held = await first.run_sync(claim_deliveries(2, True))
        other = await asyncio.wait_for(second.run_sync(claim_deliveries(10, True)), 5)
        await first.commit()
        await second.commit()
    assert set(held) == {"at-5", "at-4"} and set(other) == {"at-3", "at-2"}
    assert sorted(held + other) == sorted(names)
