"""What SES feedback does to the records, through signed SNS messages posted to the real app: statuses,
`email.*` events with their data, suppression and unsubscribe on permanent bounces and complaints (and the
next send, over the API and over SMTP, recorded as SUPPRESSED and not sent), opens and clicks counted,
campaign stats. SES itself is moto's (the real one is on the internet)."""

from __future__ import annotations

import asyncio

from sqlalchemy import select

from core.config import SesConfig
from delivery.bucket import TokenBucket
from delivery.dispatcher import Dispatcher
from delivery.transports import FileTransport
from storage import emails as email_store
from storage.models import Email, Suppression
from testkit.sns import ses_event
from tests import sns_fixtures
from tests.sns_fixtures import events, post_sns, sent_email
from tests.test_campaigns import add_contacts, create, deliver, stats
from tests.test_delivery import dispatch_all, settings
from tests.test_relay_e2e import smtp_send

signing_certificate, sns, config = sns_fixtures.signing_certificate, sns_fixtures.sns, sns_fixtures.config
"""The feedback fixtures (`config` overrides conftest's in this module)."""


async def email_row(api, email_id: str) -> Email:
    return await api.db.read(email_store.get_email, api.project_id, email_id)


async def contact(api, contact_id: str) -> dict:
    status, body = await api.call("GET", f"/contacts/{contact_id}")
    assert status == 200, body
    return body["data"]


async def suppressions(api) -> dict[str, str]:
    rows = await api.db.read(lambda s: s.execute(select(Suppression.email, Suppression.reason).where(
        Suppression.project_id == api.project_id)).all())
    return dict(rows)


async def notify(api, sns, kind: str, email: Email, shape: str = "event", **detail) -> dict:
    status, body = await post_sns(api, sns.signer.notification(ses_event(kind, email.transport_id, email.recipient,
                                                                         shape, **detail)))
    assert status == 200, body
    return body["data"]


async def test_a_permanent_bounce_suppresses_the_next_send_over_the_api_and_smtp(relay, sns, moto_server, monkeypatch,
                                                                                 tmp_path):
    """The first email goes out through SES (moto); SES's bounce for it arrives through SNS."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    from delivery.ses import SesTransport, ses_identity_verified

    ses_settings = SesConfig(region="us-east-1", endpoint_url=moto_server.url)
    assert await ses_identity_verified(ses_settings, "example.com")
    api = relay.api
    status, body = await api.call("POST", "/v1/send", json={"to": "ann@example.org", "subject": "Hi",
                                                            "body": "<p>x</p>", "subscribed": True})
    assert status == 200, body
    first_id = body["data"]["emails"][0]["email"]
    contact_id = body["data"]["emails"][0]["contact"]["id"]
    ses = SesTransport(ses_settings)
    await dispatch_all(Dispatcher(api.db, ses, TokenBucket(0), settings()))
    await ses.close()
    first = await email_row(api, first_id)
    assert first.status == "SENT" and first.transport_id, "SES took it and gave its message id"

    done = await notify(api, sns, "Bounce", first, shape="identity")
    assert done["outcome"] == "applied"
    assert done["detail"] == (f"SES Bounce for {first.transport_id}: email {first.id}: Permanent/General bounce: "
                              f"BOUNCED, ann@example.org suppressed, contact {contact_id} unsubscribed")
    first = await email_row(api, first_id)
    assert first.status == "BOUNCED" and first.error == "bounced (Permanent/General): smtp; 550 5.1.1 user unknown"
    [bounce] = await events(api, "email.bounce")
    assert bounce["emailId"] == first.id and bounce["contactId"] == contact_id
    assert {k: bounce["data"][k] for k in ("via", "messageId", "bounceType", "bounceSubType", "diagnosticCode",
                                           "status", "action")} == {
        "via": "ses", "messageId": first.transport_id, "bounceType": "Permanent", "bounceSubType": "General",
        "diagnosticCode": "smtp; 550 5.1.1 user unknown", "status": "5.1.1", "action": "failed"}
    [unsubscribed] = await events(api, "contact.unsubscribed")
    assert unsubscribed["data"] == {"reason": "bounce"} and unsubscribed["emailId"] == first.id
    assert (await contact(api, contact_id))["subscribed"] is False
    assert await suppressions(api) == {
        "ann@example.org": "bounce (Permanent/General): smtp; 550 5.1.1 user unknown"}

    status, body = await api.call("POST", "/v1/send", json={"to": "ann@example.org", "subject": "Again",
                                                            "body": "<p>x</p>"})
    assert status == 200, body
    by_api = body["data"]["emails"][0]["email"]
    raw = b"From: hello@example.com\r\nTo: ann@example.org\r\nSubject: Over SMTP\r\n\r\nHi\r\n"
    assert await asyncio.to_thread(smtp_send, relay, raw, ["ann@example.org"], "hello@example.com") == {}
    folder = tmp_path / "after"
    await dispatch_all(Dispatcher(api.db, FileTransport(folder), TokenBucket(0), settings()))
    rows = {row.source: row for row in await api.db.read(email_store.list_emails, api.project_id)
            if row.id != first.id}
    assert set(rows) == {"api", "smtp"} and rows["api"].id == by_api
    assert {row.status for row in rows.values()} == {"SUPPRESSED"}
    assert list(folder.glob("*.eml")) == [], "nothing was sent to the bounced address"


async def test_a_complaint_unsubscribes_and_suppresses_once(api, sender, sns, tmp_path):
    email = await sent_email(api, tmp_path, "cat@example.org", subscribed=True)
    await notify(api, sns, "Delivery", email)
    done = await notify(api, sns, "Complaint", email)
    assert done["outcome"] == "applied" and done["detail"].endswith(
        f"email {email.id}: COMPLAINED, cat@example.org suppressed, contact {email.contact_id} unsubscribed")
    again = await notify(api, sns, "Complaint", email, shape="identity")
    assert again["detail"].endswith("complaint already recorded"), "SES published it twice: counted once"
    assert (await email_row(api, email.id)).status == "COMPLAINED"
    [complaint] = await events(api, "email.complaint")
    assert complaint["data"]["complaintFeedbackType"] == "abuse" and complaint["emailId"] == email.id
    assert complaint["data"]["userAgent"] == "ExampleCorp Feedback Loop (V0.01)"
    assert [e["data"] for e in await events(api, "contact.unsubscribed")] == [{"reason": "complaint"}]
    assert (await contact(api, email.contact_id))["subscribed"] is False
    assert await suppressions(api) == {"cat@example.org": "complaint (abuse)"}


async def test_a_transient_bounce_is_recorded_but_does_not_suppress(api, sender, sns, tmp_path):
    email = await sent_email(api, tmp_path, "dan@example.org", subscribed=True)
    done = await notify(api, sns, "Bounce", email, bounceType="Transient", bounceSubType="MailboxFull")
    assert done["detail"].endswith(f"email {email.id}: Transient/MailboxFull bounce recorded (not suppressed)")
    assert (await email_row(api, email.id)).status == "SENT"
    [bounce] = await events(api, "email.bounce")
    assert bounce["data"]["bounceType"] == "Transient" and bounce["data"]["bounceSubType"] == "MailboxFull"
    assert await suppressions(api) == {} and (await contact(api, email.contact_id))["subscribed"] is True
    assert await events(api, "contact.unsubscribed") == []

    later = await sent_email(api, tmp_path, "dan@example.org")
    assert later.status == "SENT", "the next send still goes out"
    await notify(api, sns, "Bounce", email)
    assert (await email_row(api, email.id)).status == "BOUNCED", "a permanent bounce after a transient one counts"
    assert list(await suppressions(api)) == ["dan@example.org"]


async def test_delivery_is_recorded_once_whichever_shape_says_it(api, sender, sns, tmp_path):
    email = await sent_email(api, tmp_path)
    first = await notify(api, sns, "Delivery", email, shape="identity")
    second = await notify(api, sns, "Delivery", email, shape="event")
    assert first["detail"].endswith(f"email {email.id}: delivered")
    assert second["detail"].endswith(f"email {email.id}: delivery already recorded")
    assert len(await events(api, "email.delivery")) == 1
    assert (await email_row(api, email.id)).status == "DELIVERED"
    await notify(api, sns, "Complaint", email)
    await notify(api, sns, "Delivery", email)
    assert (await email_row(api, email.id)).status == "COMPLAINED", "a late delivery does not undo a complaint"


async def test_opens_and_clicks_are_counted_and_reach_campaign_stats(api, sender, sns, tmp_path):
    await add_contacts(api, 2)
    campaign = await create(api)
    status, body = await api.call("POST", f"/campaigns/{campaign['id']}/send", json={})
    assert status == 200, body
    await deliver(api, tmp_path / "out")
    first, second = await api.db.read(lambda s: list(s.execute(
        select(Email).where(Email.campaign_id == campaign["id"]).order_by(Email.recipient)).scalars()))
    for email in (first, second):
        await notify(api, sns, "Delivery", email)
    opens = [await notify(api, sns, "Open", first) for _ in range(3)]
    assert [o["detail"].rsplit(": ", 1)[1] for o in opens] == ["open #1", "open #2", "open #3"]
    await notify(api, sns, "Click", first)
    await notify(api, sns, "Bounce", second)
    recorded = sorted(await events(api, "email.open"), key=lambda e: e["data"]["count"])
    assert [(e["data"]["first"], e["data"]["count"]) for e in recorded] == [(True, 1), (False, 2), (False, 3)]
    assert recorded[0]["data"]["userAgent"] == "Mozilla/5.0 (Mail)" and recorded[0]["data"]["ipAddress"] == "192.0.2.1"
    [click] = await events(api, "email.click")
    assert click["data"]["link"] == "https://example.com/offer?x=1" and click["data"]["first"] is True
    assert click["data"]["linkTags"] == {"campaign": ["november"]}
    counts = await stats(api, campaign["id"])
    assert {k: counts[k] for k in ("sent", "delivered", "opened", "clicked", "bounced", "complained",
                                   "unsubscribed")} == {
        "sent": 2, "delivered": 2, "opened": 1, "clicked": 1, "bounced": 1, "complained": 0, "unsubscribed": 1}


async def test_reject_fails_the_email_and_send_and_delay_change_nothing(api, sender, sns, tmp_path):
    email = await sent_email(api, tmp_path)
    for kind in ("Send", "DeliveryDelay"):
        done = await notify(api, sns, kind, email)
        assert done["outcome"] == "applied" and done["detail"].endswith(f"email {email.id}: {kind} noted")
    assert (await email_row(api, email.id)).status == "SENT"
    done = await notify(api, sns, "Reject", email)
    assert done["detail"].endswith("FAILED (rejected by SES)")
    row = await email_row(api, email.id)
    assert row.status == "FAILED" and row.error == "SES rejected the message: Bad content"
    for name in ("email.delivery", "email.bounce", "email.complaint", "email.open", "email.click"):
        assert await events(api, name) == []


async def test_a_bounce_naming_someone_else_changes_nothing(api, sender, sns, tmp_path):
    email = await sent_email(api, tmp_path, subscribed=True)
    done = await notify(api, sns, "Bounce", email, bouncedRecipients=[{"emailAddress": "Other <other@example.org>"}])
    assert done["detail"].endswith("the notification names none of the message's recipients")
    assert (await email_row(api, email.id)).status == "SENT" and await suppressions(api) == {}
    done = await notify(api, sns, "Bounce", email, bouncedRecipients=[{"emailAddress": "Ann <ANN@example.org>"}])
    assert "BOUNCED" in done["detail"], "a named recipient is matched by address, whatever its case or name"
