"""Bulk headers (issue 25, item 5): campaign and workflow mail goes out with `Feedback-ID:
<campaign or workflow id>:<project id>:<From domain>` (Gmail's feedback loop) and `Precedence: bulk`;
transactional mail (`/v1/send`, the SMTP relay) carries neither. Checked on the delivered .eml files (the
file transport), DKIM-signed as they go out."""

from __future__ import annotations

import asyncio
import email
from email import policy

from core.config import DeliveryConfig
from delivery.bucket import TokenBucket
from delivery.dispatcher import Dispatcher
from delivery.transports import FileTransport
from tests.test_campaigns import add_contacts, create, deliver, delivered, dispatcher_for
from tests.test_delivery import dispatch_all
from tests.test_relay_e2e import smtp_send
from tests.test_templates import signed_headers
from tests.test_workflows_engine import make_template, make_workflow, scheduler_for, track_event


def messages_in(folder) -> list[email.message.EmailMessage]:
    return [email.message_from_bytes(path.read_bytes(), policy=policy.default) for path in folder.glob("*.eml")]


async def test_campaign_mail_carries_feedback_id_and_precedence_bulk(api, sender, tmp_path):
    await add_contacts(api, 2)
    campaign = await create(api)
    status, body = await api.call("POST", f"/campaigns/{campaign['id']}/send", json={})
    assert status == 200, body
    folder = tmp_path / "out"
    await deliver(api, folder)
    messages = delivered(folder)
    assert sorted(messages) == ["reader0@example.org", "reader1@example.org"]
    for message in messages.values():
        assert message["Feedback-ID"] == f"{campaign['id']}:{api.project_id}:example.com"
        assert message["Precedence"] == "bulk"
    assert all("feedback-id" in signed_headers(path.read_bytes()) for path in folder.glob("*.eml"))


async def test_workflow_mail_carries_the_workflows_feedback_id(api, sender, tmp_path):
    template = await make_template(api, "TRANSACTIONAL")
    workflow = await make_workflow(api, [{"id": "mail", "type": "send", "template": template}], ["signed-up"])
    await track_event(api, "ann@example.org", "signed-up", {"plan": "pro"})
    await scheduler_for(api).run_until_idle()
    folder = tmp_path / "out"
    await dispatch_all(dispatcher_for(api, folder))
    [message] = messages_in(folder)
    assert message["To"] == "ann@example.org"
    assert message["Feedback-ID"] == f"{workflow}:{api.project_id}:example.com"
    assert message["Precedence"] == "bulk"


async def test_transactional_mail_over_the_api_and_the_relay_carries_neither(relay, tmp_path):
    api = relay.api
    status, body = await api.call("POST", "/v1/send", json={"to": "bob@example.org", "subject": "Receipt",
                                                            "body": "<p>Thanks</p>", "from": "hello@example.com"})
    assert status == 200, body
    raw = (b"From: Shop <hello@example.com>\r\nTo: ann@example.org\r\nSubject: Receipt\r\n"
           b"Content-Type: text/plain; charset=utf-8\r\n\r\nThanks\r\n")
    assert await asyncio.to_thread(smtp_send, relay, raw, ["ann@example.org"], "hello@example.com") == {}
    folder = tmp_path / "out"
    await dispatch_all(Dispatcher(api.db, FileTransport(folder), TokenBucket(0), DeliveryConfig()))
    messages = messages_in(folder)
    assert sorted(str(message["To"]) for message in messages) == ["ann@example.org", "bob@example.org"]
    for message in messages:
        assert message["Feedback-ID"] is None and message["Precedence"] is None
