"""The smtp transport's bounces: a real aiosmtpd smarthost on 127.0.0.1 refusing with a 5xx at RCPT or DATA is a
permanent bounce on the served app's own wiring (status BOUNCED, `email.bounce`, suppression, unsubscribe,
exactly as an SES permanent bounce); a 5xx at MAIL FROM is the sender's failure, a 4xx a retry."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

import pytest
from aiosmtpd.smtp import SMTP, Envelope
from sqlalchemy import select

from api.context import DB
from core.config import SmarthostConfig
from delivery.bucket import TokenBucket
from delivery.dispatcher import Dispatcher
from delivery.transports import SmtpTransport
from feedback.effects import smtp_bounce
from pipeline.projects import create_project
from plunkd.app import create_app
from storage import emails as email_store
from storage.models import Suppression
from tests.conftest import Api, add_verified_domain
from tests.sns_fixtures import events
from tests.test_delivery import dispatch_all, settings

REFUSED_AT_RCPT = "550 5.1.1 <gone@example.org>: Recipient address rejected: User unknown"


@dataclass
class Smarthost:
    """Refuses `gone@example.org` at RCPT; answers MAIL and DATA with the replies set."""

    mail_reply: str = "250 OK"
    data_reply: str = "250 2.0.0 OK queued as HOST{n}"
    rcpts_tried: list[str] = field(default_factory=list)
    delivered: list[Envelope] = field(default_factory=list)
    port: int = 0

    async def handle_MAIL(self, server, session, envelope, address, mail_options) -> str:
        if self.mail_reply.startswith("250"):
            envelope.mail_from = address
        return self.mail_reply

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options) -> str:
        self.rcpts_tried.append(address)
        if address == "gone@example.org":
            return REFUSED_AT_RCPT
        if address == "busy@example.org":
            return "450 4.2.1 mailbox busy, try later"
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server, session, envelope) -> str:
        if self.data_reply.startswith("250"):
            self.delivered.append(envelope)
        return self.data_reply.format(n=len(self.delivered))


@pytest.fixture
async def smarthost():
    host = Smarthost()
    server = await asyncio.get_running_loop().create_server(lambda: SMTP(host), "127.0.0.1", 0)
    host.port = server.sockets[0].getsockname()[1]
    yield host
    server.close()
    await server.wait_closed()


@pytest.fixture
async def served(aiohttp_client, dns_config, dns_server, smarthost) -> Api:
    """The app as `plunkd serve` wires it (dispatcher in this process), delivering through the smarthost."""
    dns_config.delivery.enabled = True
    dns_config.delivery.transport = "smtp"
    dns_config.delivery.smtp = SmarthostConfig(host="127.0.0.1", port=smarthost.port, timeout_seconds=5)
    dns_config.delivery.poll_seconds = 0.05
    dns_config.delivery.retry_base_seconds = 60.0
    app = create_app(dns_config)
    client = await aiohttp_client(app)
    issued = await app[DB].write(lambda s: create_project(s, "bounces", "hello@example.com", "Bounces"))
    api = Api(client, app[DB], issued.project.id, issued.secret_key, issued.public_key)
    await add_verified_domain(api, dns_server)
    return api


async def send(api, to: str, **extra) -> str:
    status, body = await api.call("POST", "/v1/send", json={"to": to, "subject": "Hi", "body": "<p>x</p>", **extra})
    assert status == 200, body
    return body["data"]["emails"][0]["email"]


async def settled(api, email_id: str, seconds: float = 10.0):
    deadline = time.monotonic() + seconds
    while True:
        row = await api.db.read(email_store.get_email, api.project_id, email_id)
        if row.status != "QUEUED" or time.monotonic() > deadline:
            return row
        await asyncio.sleep(0.05)


async def suppressed(api) -> dict[str, str]:
    return dict(await api.db.read(lambda s: s.execute(select(Suppression.email, Suppression.reason).where(
        Suppression.project_id == api.project_id)).all()))


async def test_a_5xx_at_rcpt_is_a_permanent_bounce_and_the_next_send_is_suppressed(served, smarthost):
    email_id = await send(served, "gone@example.org", subscribed=True)
    row = await settled(served, email_id)
    assert row.status == "BOUNCED" and row.error == REFUSED_AT_RCPT
    [bounce] = await events(served, "email.bounce")
    assert bounce["emailId"] == email_id and bounce["contactId"] == row.contact_id
    assert bounce["data"] == {"via": "smtp", "bounceType": "Permanent", "bounceSubType": "General",
                              "diagnosticCode": REFUSED_AT_RCPT}
    [unsubscribed] = await events(served, "contact.unsubscribed")
    assert unsubscribed["data"] == {"reason": "bounce"} and unsubscribed["emailId"] == email_id
    status, body = await served.call("GET", f"/contacts/{row.contact_id}")
    assert status == 200 and body["data"]["subscribed"] is False
    assert await suppressed(served) == {"gone@example.org": f"bounce (smtp): {REFUSED_AT_RCPT}"}

    again = await settled(served, await send(served, "gone@example.org"))
    assert again.status == "SUPPRESSED"
    assert smarthost.rcpts_tried == ["gone@example.org"], "the suppressed address was not tried again"
    fine = await settled(served, await send(served, "ann@example.org"))
    assert fine.status == "SENT" and [e.rcpt_tos for e in smarthost.delivered] == [["ann@example.org"]]


async def test_a_5xx_at_data_is_a_permanent_bounce(served, smarthost):
    smarthost.data_reply = "554 5.7.1 message refused by policy"
    email_id = await send(served, "ann@example.org", subscribed=True)
    row = await settled(served, email_id)
    assert row.status == "BOUNCED" and row.error == "554 5.7.1 message refused by policy"
    assert [e["data"]["diagnosticCode"] for e in await events(served, "email.bounce")] == [
        "554 5.7.1 message refused by policy"]
    assert list(await suppressed(served)) == ["ann@example.org"]


async def test_a_5xx_at_mail_from_fails_without_blaming_the_recipient(served, smarthost):
    smarthost.mail_reply = "550 5.7.1 sender not allowed"
    email_id = await send(served, "ann@example.org", subscribed=True)
    row = await settled(served, email_id)
    assert row.status == "FAILED" and row.error == "550 5.7.1 sender not allowed"
    assert await events(served, "email.bounce") == [] and await suppressed(served) == {}
    assert await events(served, "contact.unsubscribed") == []


async def test_a_4xx_at_rcpt_is_retried_not_bounced(api, sender, smarthost):
    email_id = await send(api, "busy@example.org")
    transport = SmtpTransport(SmarthostConfig(host="127.0.0.1", port=smarthost.port, timeout_seconds=5))
    dispatcher = Dispatcher(api.db, transport, TokenBucket(0), settings(retry_base_seconds=60),
                            record_bounce=smtp_bounce)
    await dispatch_all(dispatcher)
    await transport.close()
    row = await api.db.read(email_store.get_email, api.project_id, email_id)
    [outbox] = await api.db.read(email_store.outbox_rows)
    assert row.status == "QUEUED" and outbox.attempts == 1 and outbox.last_error.startswith("450 4.2.1")
    assert await events(api, "email.bounce") == [] and await suppressed(api) == {}
