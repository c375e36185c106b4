"""The reputation guard (issue 25, item 4), on the real app and database: 600 sends through a smarthost (a
real aiosmtpd server on loopback that refuses 4 % of the recipients at RCPT: hard bounces), then complaints
through the SES feedback intake (signed SNS notifications to the real endpoint; SES itself is on the
internet, so the stand-in SNS host of `tests.sns_fixtures` signs them). The bounce rate crosses the warning
level (one `reputation.warning`), the complaints cross the pause level: the running campaign is PAUSED
(`campaign.paused`, its queued mail parked), workflow sends wait, `/v1/send` keeps going out; a user
resumes the campaign over the API and its mail goes out. The rates are read from daily counters: judging
costs the same few statements whatever the project sent."""

from __future__ import annotations

import pytest
from sqlalchemy import event, func, select, text, update

from api.context import LINKS
from core.config import SmarthostConfig
from delivery.bucket import TokenBucket
from delivery.dispatcher import Dispatcher
from delivery.transports import SmtpTransport
from feedback.effects import smtp_bounce
from marketing.fanout import CampaignFanOut
from pipeline import reputation
from storage import reputation as reputation_store
from storage.models import Email, OutboxItem, WorkflowRun, utcnow
from testkit.sns import ses_event
from tests import sns_fixtures
from tests.servers import SinkHandler, start_sink
from tests.sns_fixtures import events, post_sns
from tests.test_campaigns import add_contacts, create, dispatcher_for
from tests.test_delivery import dispatch_all, settings
from tests.test_workflows_engine import make_template, make_workflow, scheduler_for, track_event

signing_certificate, sns, config = sns_fixtures.signing_certificate, sns_fixtures.sns, sns_fixtures.config
"""The feedback fixtures (`config` overrides conftest's in this module)."""


class BouncingSink(SinkHandler):
    """The smarthost: refuses recipients named gone* at RCPT (a hard bounce), takes the rest."""

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
        if address.startswith("gone"):
            return f"550 5.1.1 <{address}>: user unknown"
        envelope.rcpt_tos.append(address)
        return "250 OK"


@pytest.fixture
async def smarthost():
    handler = BouncingSink()
    server, port = await start_sink(handler)
    handler.port = port
    yield handler
    server.close()
    await server.wait_closed()


def address(index: int) -> str:
    return f"{'gone' if index % 25 == 24 else 'user'}{index}@example.org"


async def send_600(api, smarthost) -> None:
    """600 emails over /v1/send, 24 of them to addresses the smarthost refuses, delivered through it."""
    for first in range(0, 600, 50):
        status, body = await api.call("POST", "/v1/send", json={
            "to": [address(index) for index in range(first, first + 50)], "subject": "Receipt", "body": "Thanks"})
        assert status == 200, body
    transport = SmtpTransport(SmarthostConfig(host="127.0.0.1", port=smarthost.port, timeout_seconds=10))
    try:
        await dispatch_all(Dispatcher(api.db, transport, TokenBucket(0), settings(concurrency=20),
                                      record_bounce=smtp_bounce), rounds=200)
    finally:
        await transport.close()


async def reputation_of(api, key: str | None = None) -> dict:
    status, body = await api.call("GET", "/projects/reputation", key=key)
    assert status == 200, body
    return body["data"]


async def complain(api, sns, email: Email) -> None:
    status, body = await post_sns(api, sns.signer.notification(ses_event("Complaint", email.transport_id,
                                                                         email.recipient, "event")))
    assert status == 200 and body["data"]["outcome"] == "applied", body


async def test_bounces_warn_complaints_pause_campaigns_and_workflows_while_transactional_mail_goes_on(
        api, sender, sns, smarthost, tmp_path):
    status, hook = await api.call("POST", "/webhooks", json={
        "url": "https://hooks.example.com/plunk", "events": ["reputation.warning", "campaign.paused"]})
    assert status == 201, hook
    await send_600(api, smarthost)
    assert len(smarthost.messages) == 576
    shown = await reputation_of(api)
    assert {key: shown[key] for key in ("sent", "bounced", "complained", "bounceRate", "bounceLevel",
                                        "complaintLevel", "judged", "paused")} == {
        "sent": 600, "bounced": 24, "complained": 0, "bounceRate": 0.04, "bounceLevel": "WARN",
        "complaintLevel": "OK", "judged": True, "paused": False}
    [warning] = await events(api, "reputation.warning")
    assert (warning["data"]["metric"], warning["data"]["level"], warning["data"]["threshold"]) == ("bounce", "WARN",
                                                                                                  0.02)

    readers = await add_contacts(api, 3)
    campaign = await create(api, recipients=[reader["id"] for reader in readers])
    status, body = await api.call("POST", f"/campaigns/{campaign['id']}/send", json={})
    assert status == 200, body
    await CampaignFanOut(api.db, api.client.app[LINKS], lambda: None).run_once()
    status, body = await api.call("GET", f"/campaigns/{campaign['id']}")
    assert body["data"]["status"] == "SENDING"
    template = await make_template(api, "MARKETING", body="<p>Welcome</p>")
    workflow = await make_workflow(api, [{"id": "mail", "type": "send", "template": template}], ["joined"])

    sent = await api.db.read(lambda s: list(s.execute(select(Email).where(
        Email.status == "SENT", Email.source == "api").order_by(Email.id).limit(20)).scalars()))
    for email in sent:
        await complain(api, sns, email)

    shown = await reputation_of(api)
    assert (shown["complained"], shown["complaintLevel"], shown["paused"]) == (20, "PAUSE", True)
    assert abs(shown["complaintRate"] - 20 / 600) < 1e-6
    status, body = await api.call("GET", f"/campaigns/{campaign['id']}")
    assert body["data"]["status"] == "PAUSED"
    [paused] = await events(api, "campaign.paused")
    assert paused["data"]["campaignId"] == campaign["id"] and paused["data"]["metric"] == "complaint"
    assert paused["data"]["parked"] == 3
    await CampaignFanOut(api.db, api.client.app[LINKS], lambda: None).run_once()  # parks them, after the pause
    assert await api.db.read(lambda s: s.execute(select(func.count()).select_from(OutboxItem).where(
        OutboxItem.hold == "PAUSED")).scalar_one()) == 3
    assert sorted(e["data"]["metric"] for e in await events(api, "reputation.warning")) == ["bounce", "complaint"]
    assert len(await events(api, "reputation.paused")) == 1, "once per crossing, not per complaint"
    status, body = await api.call("GET", f"/webhooks/{hook['data']['id']}/deliveries")
    assert sorted(d["type"] for d in body["data"]["items"]) == ["campaign.paused", "reputation.warning",
                                                               "reputation.warning"]

    await track_event(api, "newbie@example.org", "joined")
    await scheduler_for(api).run_until_idle()
    [run] = await api.db.read(lambda s: list(s.execute(select(WorkflowRun).where(
        WorkflowRun.workflow_id == workflow)).scalars()))
    assert run.status == "ACTIVE" and run.emails_sent == 0 and run.due_at > utcnow(), "waits at its send step"

    status, body = await api.call("POST", "/v1/send", json={"to": "late@example.org", "subject": "Receipt",
                                                            "body": "Still going"})
    assert status == 200, body
    folder = tmp_path / "out"
    await dispatch_all(dispatcher_for(api, folder))
    assert [path.read_bytes().count(b"late@example.org") > 0 for path in folder.glob("*.eml")] == [True]
    resp = await api.client.get("/metrics")
    metrics = dict(line.rsplit(" ", 1) for line in (await resp.text()).splitlines() if not line.startswith("#"))
    assert float(metrics['plunkd_outbox_held{reason="PAUSED"}']) == 3.0
    assert float(metrics[f'plunkd_project_complaint_rate{{project="{api.project_id}"}}']) == pytest.approx(20 / 601)
    assert float(metrics[f'plunkd_project_bounce_rate{{project="{api.project_id}"}}']) == pytest.approx(24 / 601)

    status, body = await api.call("POST", f"/campaigns/{campaign['id']}/resume")
    assert status == 200 and body["data"]["status"] == "SENDING", body
    assert (await reputation_of(api))["paused"] is False
    await dispatch_all(dispatcher_for(api, folder))
    assert len(list(folder.glob("*.eml"))) == 4, "the campaign's three went out"
    await CampaignFanOut(api.db, api.client.app[LINKS], lambda: None).run_once()
    status, body = await api.call("GET", f"/campaigns/{campaign['id']}")
    assert body["data"]["status"] == "SENT"
    await api.db.write(lambda s: s.execute(update(WorkflowRun).values(due_at=utcnow())))
    await scheduler_for(api).run_until_idle()
    [run] = await api.db.read(lambda s: list(s.execute(select(WorkflowRun)).scalars()))
    assert run.emails_sent == 1, "workflow sends go on after the resume"


async def test_resume_refuses_what_it_should(api, sender):
    campaign = await create(api, recipients=[(await add_contacts(api, 1))[0]["id"]])
    path = f"/campaigns/{campaign['id']}/resume"
    status, body = await api.call("POST", path)
    assert status == 409 and body["error"]["code"] == "CONFLICT", body
    assert "only a paused campaign can be resumed" in body["error"]["message"]
    resp = await api.client.post(path)
    assert resp.status == 401 and (await resp.json())["error"]["code"] == "UNAUTHORIZED"
    resp = await api.client.post(path, headers={"Authorization": "Bearer sk_not_a_key"})
    assert resp.status == 401
    status, body = await api.call("POST", path, key=api.pk)
    assert status == 403 and body["error"]["code"] == "FORBIDDEN", body
    _, other_sk, _ = await api.new_project()
    status, body = await api.call("POST", path, key=other_sk)
    assert status == 404 and body["error"]["code"] == "NOT_FOUND", "another project's campaign"
    status, body = await api.call("POST", "/campaigns/no-such-campaign/resume")
    assert status == 404 and body["error"]["code"] == "NOT_FOUND"
    status, body = await api.call("POST", f"{path}?force=1")
    assert status == 422 and body["error"]["code"] == "VALIDATION_ERROR"
    status, body = await api.call("GET", f"/campaigns/{campaign['id']}")
    assert body["data"]["status"] == "DRAFT", "nothing changed"


async def test_reputation_needs_a_secret_key_and_shows_only_the_callers_project(api, sender):
    await api.db.write(lambda s: reputation_store.count_feedback(s, api.project_id, utcnow(), bounced=3))
    resp = await api.client.get("/projects/reputation")
    assert resp.status == 401 and (await resp.json())["error"]["code"] == "UNAUTHORIZED"
    status, body = await api.call("GET", "/projects/reputation", key=api.pk)
    assert status == 403 and body["error"]["code"] == "FORBIDDEN", body
    _, other_sk, _ = await api.new_project()
    assert (await reputation_of(api, other_sk))["bounced"] == 0
    mine = await reputation_of(api)
    assert (mine["bounced"], mine["sent"], mine["judged"], mine["bounceLevel"]) == (3, 0, False, "OK")
    status, body = await api.call("GET", "/projects/reputation?window=30")
    assert status == 422 and body["error"]["code"] == "VALIDATION_ERROR"


async def test_judging_costs_the_same_few_statements_whatever_was_sent(api, sender):
    """Counters, not counts: a hard bounce's judgement reads one primary-key range of at most 8 days ×
    16 shards, whether the project sent 10 emails or 100,000."""
    day = reputation_store.day_of(utcnow())

    def seed(session, sent: int) -> None:
        for shard in range(reputation_store.SHARDS):
            for offset in range(1, 11):  # today has the warm-up's row
                session.execute(reputation_store.DAYS.insert().values(
                    project_id=api.project_id, day=day - offset, shard=shard, sent=sent, bounced=0, complained=0))

    async def statements_of_one_bounce() -> list[str]:
        seen: list[str] = []

        def record(conn, cursor, statement, *args) -> None:
            seen.append(statement)

        engine = api.db.engine.sync_engine
        event.listen(engine, "before_cursor_execute", record)
        try:
            await api.db.write(lambda s: reputation.record_feedback(s, api.project_id, bounced=1))
        finally:
            event.remove(engine, "before_cursor_execute", record)
        return [statement for statement in seen if "reputation" in statement]

    await statements_of_one_bounce()  # the project's first judgement makes its state row
    await api.db.write(lambda s: seed(s, 1))
    few = await statements_of_one_bounce()
    await api.db.write(lambda s: s.execute(reputation_store.DAYS.update().values(sent=1000)))
    many = await statements_of_one_bounce()
    assert len(few) == len(many) <= 3, (few, many)  # the window, the state row, the counters' upsert

    def plan(session) -> str:
        window = reputation_store._WINDOW.params(project_id=api.project_id, first=day - 7, last=day)
        sql = str(window.compile(session.get_bind(), compile_kwargs={"literal_binds": True}))
        explain = "EXPLAIN " if api.db.is_postgres else "EXPLAIN QUERY PLAN "
        return " | ".join(str(row[-1]) for row in session.execute(text(explain + sql)))

    shown = await api.db.read(plan)
    if api.db.is_postgres:  # a table this small may be read whole; never by anything but the key's range
        assert "reputation_days_pkey" in shown or "Seq Scan" in shown, shown
    else:
        assert "SEARCH" in shown and ("PRIMARY KEY" in shown or "sqlite_autoindex_reputation_days" in shown), shown


async def test_a_campaign_scheduled_while_the_project_is_paused_pauses_when_due(api, sender):
    def pause(session) -> None:
        reputation_store.state_for_update(session, api.project_id).marketing_paused = True

    await api.db.write(pause)
    campaign = await create(api, recipients=[(await add_contacts(api, 2))[0]["id"]])
    status, body = await api.call("POST", f"/campaigns/{campaign['id']}/send", json={})
    assert status == 200, body
    assert await CampaignFanOut(api.db, api.client.app[LINKS], lambda: None).run_once() == 0
    status, body = await api.call("GET", f"/campaigns/{campaign['id']}")
    assert body["data"]["status"] == "PAUSED"
    status, body = await api.call("POST", f"/campaigns/{campaign['id']}/resume")
    assert status == 200 and body["data"]["status"] == "SCHEDULED", "it had not started"
    assert await CampaignFanOut(api.db, api.client.app[LINKS], lambda: None).run_once() == 1
