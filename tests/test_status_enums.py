"""Statuses and outcomes are StrEnums (storage.models, delivery.transports): a member is its plain text in
the database, in SQL parameters, in JSON replies and in metrics labels, and the API documents exactly the
members each enum has."""

from __future__ import annotations

import json
from typing import get_args

from prometheus_client import CollectorRegistry, Counter, generate_latest
from sqlalchemy import select, text
from sqlalchemy.dialects import postgresql, sqlite

import api.webhooks
import api.workflows
from api.campaigns import CampaignOut
from api.context import LINKS
from delivery.result import SendOutcome, SendResult
from marketing.fanout import CampaignFanOut
from storage import webhooks as webhook_store
from storage.models import CampaignStatus, EmailStatus, RunStatus, WebhookDeliveryStatus, WorkflowRun
from storage.workflows import LIVE
from tests.test_campaigns import add_contacts, campaign, create


async def stored(api, sql: str, **params) -> list[str]:
    return await api.db.read(lambda s: list(s.execute(text(sql), params).scalars()))


async def test_campaign_and_email_statuses_are_plain_text_in_the_database_and_in_json(api, sender):
    await add_contacts(api, 2)
    created = await create(api)
    assert created["status"] == "DRAFT"
    assert await stored(api, "SELECT status FROM campaigns WHERE id = :i AND status = 'DRAFT'",
                        i=created["id"]) == ["DRAFT"]

    status, body = await api.call("POST", f"/campaigns/{created['id']}/send", json={})
    assert status == 200, body
    await CampaignFanOut(api.db, api.client.app[LINKS], lambda: None).run_once()
    assert (await campaign(api, created["id"]))["status"] == "SENDING"
    assert await stored(api, "SELECT status FROM emails WHERE campaign_id = :i AND status = 'QUEUED'",
                        i=created["id"]) == ["QUEUED", "QUEUED"]

    status, body = await api.call("POST", f"/campaigns/{created['id']}/cancel")
    assert status == 200 and body["data"]["status"] == "CANCELLED", body
    assert await stored(api, "SELECT status FROM campaigns WHERE id = :i AND status = 'CANCELLED'",
                        i=created["id"]) == ["CANCELLED"]
    assert await stored(api, "SELECT status FROM emails WHERE campaign_id = :i AND status = 'CANCELLED'",
                        i=created["id"]) == ["CANCELLED", "CANCELLED"]


def test_a_member_is_its_text_in_sql_json_and_metrics():
    query = select(WorkflowRun.id).where(WorkflowRun.status.in_(LIVE))
    for dialect in (sqlite.dialect(), postgresql.dialect()):
        rendered = str(query.compile(dialect=dialect, compile_kwargs={"literal_binds": True}))
        assert "IN ('ACTIVE', 'WAITING')" in rendered, rendered
    assert json.dumps({"status": EmailStatus.SENT, "outcome": SendResult.sent("id-1").outcome}) == \
        '{"status": "SENT", "outcome": "sent"}'
    registry = CollectorRegistry()
    Counter("emails_failed", "by status", ["status"], registry=registry).labels(EmailStatus.SUPPRESSED).inc()
    assert b'emails_failed_total{status="SUPPRESSED"} 1.0' in generate_latest(registry)
    assert f"{RunStatus.FAILED}" == "FAILED" and str(SendOutcome.RETRY) == "retry"


def test_the_api_documents_exactly_the_members_of_each_status_enum():
    assert set(get_args(CampaignOut.model_fields["status"].annotation)) == set(CampaignStatus)
    assert set(get_args(api.workflows.RunStatus)) == set(RunStatus)
    assert set(get_args(api.webhooks.DeliveryStatus)) == set(WebhookDeliveryStatus)
    assert set(webhook_store.STATUSES) == {"PENDING", "DELIVERED", "FAILED"}
