"""POST /v1/send: records, rendering, subscription rules, idempotency and bad input."""

from __future__ import annotations

import asyncio
import base64
import email
import json
from email import policy

import pytest

from storage import contacts as contact_store
from storage import emails as email_store


async def send(api, **payload):
    payload.setdefault("to", "ann@example.org")
    payload.setdefault("subject", "Hello")
    payload.setdefault("body", "<p>Hi there</p>")
    return await api.call("POST", "/v1/send", json=payload)


async def stored_messages(api):
    emails = await api.db.read(email_store.list_emails, api.project_id)
    contents = {}
    for row in emails:
        claimed = await api.db.read(lambda s, i=row.id: s.execute(
            __import__("sqlalchemy").text("SELECT raw FROM contents c JOIN emails e ON e.content_id = c.id "
                                          "WHERE e.id = :i"), {"i": i}).scalar_one())
        contents[row.recipient] = email.message_from_bytes(claimed, policy=policy.default)
    return emails, contents


async def test_send_records_and_reply_shape(api, sender):
    status, body = await send(api, to=["Ann@Example.org", "bob@example.org", "ann@example.org"])
    assert status == 200, body
    emails = body["data"]["emails"]
    assert [e["contact"]["email"] for e in emails] == ["ann@example.org", "bob@example.org"]
    assert body["data"]["timestamp"].endswith("Z")
    rows, messages = await stored_messages(api)
    assert {r.id for r in rows} == {e["email"] for e in emails}
    assert {r.status for r in rows} == {"QUEUED"} and {r.source for r in rows} == {"api"}
    assert len(await api.db.read(email_store.outbox_rows)) == 2
    msg = messages["ann@example.org"]
    assert msg["From"] == "Test <hello@example.com>" and msg["To"] == "ann@example.org"
    assert msg.get_content_type() == "multipart/alternative"
    assert msg.get_body(("plain",)).get_content().strip() == "Hi there"
    assert msg.get_body(("html",)).get_content().strip() == "<p>Hi there</p>"
    contact = await api.db.read(contact_store.get_contact_by_email, api.project_id, "ann@example.org")
    assert contact.subscribed is False, "new contacts from a send are not subscribed"


async def test_rendering_with_contact_data_and_defaults(api, sender):
    await api.call("POST", "/contacts", json={"email": "ann@example.org", "data": {"firstName": "Ann"}})
    status, _ = await send(api, to=["ann@example.org", "bob@example.org"], subject="Hi {{firstName ?? friend}}",
                           body="Hello {{ firstName ?? there }}, order {{order}} for {{plunk_email}} id={{plunk_id}}",
                           data={"order": "A-1"})
    assert status == 200
    _, messages = await stored_messages(api)
    ann, bob = messages["ann@example.org"], messages["bob@example.org"]
    assert ann["Subject"] == "Hi Ann" and bob["Subject"] == "Hi friend"
    assert ann.get_content_type() == "text/plain"
    text = bob.get_content()
    assert text.startswith("Hello there, order A-1 for bob@example.org id=")
    contact = await api.db.read(contact_store.get_contact_by_email, api.project_id, "bob@example.org")
    assert text.strip().endswith(contact.id)
    assert contact.data == {}, "send data is for the template, not stored on the contact"


async def test_html_values_are_escaped(api, sender):
    await api.call("POST", "/contacts", json={"email": "ann@example.org", "data": {"name": "<script>x</script>"}})
    await send(api, body="<p>Hi {{name}}</p>")
    _, messages = await stored_messages(api)
    html = messages["ann@example.org"].get_body(("html",)).get_content()
    assert "<script>" not in html and "&lt;script&gt;" in html


async def test_subscription_rules_on_send(api, sender):
    await api.call("POST", "/contacts", json={"email": "sub@example.org", "subscribed": True})
    await api.call("POST", "/contacts", json={"email": "unsub@example.org", "subscribed": False})
    await send(api, to="sub@example.org", subscribed=False)
    await send(api, to="unsub@example.org", subscribed=True)
    await send(api, to="new@example.org", subscribed=True)
    read = api.db.read
    assert (await read(contact_store.get_contact_by_email, api.project_id, "sub@example.org")).subscribed is True
    assert (await read(contact_store.get_contact_by_email, api.project_id, "unsub@example.org")).subscribed is True
    assert (await read(contact_store.get_contact_by_email, api.project_id, "new@example.org")).subscribed is True


async def test_attachments_and_headers_kept(api, sender):
    pdf = bytes(range(256)) * 40
    status, body = await send(api, reply="help@example.com", name="Shop", headers={"X-Campaign": "spring"},
                              attachments=[{"filename": "a.pdf", "content": base64.b64encode(pdf).decode(),
                                            "contentType": "application/pdf"},
                                           {"filename": "n.txt", "content": base64.b64encode(b"note").decode(),
                                            "type": "text/plain"}])
    assert status == 200, body
    _, messages = await stored_messages(api)
    msg = messages["ann@example.org"]
    assert msg["Reply-To"] == "help@example.com" and msg["X-Campaign"] == "spring"
    assert msg["From"] == "Shop <hello@example.com>"
    parts = {p.get_filename(): p for p in msg.iter_attachments()}
    assert parts["a.pdf"].get_content() == pdf and parts["a.pdf"].get_content_type() == "application/pdf"
    assert parts["n.txt"].get_payload(decode=True) == b"note"


SEED_002_SEND_EXAMPLE = """{
  "to": "<string>",
  "subject": "<string>",
  "body": "<string>",
  "subscribed": true,
  "name": "<string>",
  "from": "<string>",
  "reply": "<string>",
  "headers": {},
  "attachments": {}
}"""
"""The body of seed 002's `POST /v1/send` example, pasted as the document writes it."""
SEED_PLACEHOLDERS = {"to": "reader@example.org", "subject": "Hello", "body": "<p>Hi</p>", "name": "Shop",
                     "from": "hello@example.com", "reply": "help@example.com"}


@pytest.mark.parametrize("path", ["/api/v1/send", "/v1/send"])
async def test_seed_002_send_example_is_accepted(api, sender, path):
    example = json.loads(SEED_002_SEND_EXAMPLE)
    payload = {key: SEED_PLACEHOLDERS[key] if value == "<string>" else value for key, value in example.items()}
    assert payload["headers"] == {} and payload["attachments"] == {}
    status, body = await api.call("POST", path, data=json.dumps(payload), headers={"Content-Type": "application/json"})
    assert status == 200, body
    emails = body["emails"] if path.startswith("/api") else body["data"]["emails"]
    assert [e["contact"]["email"] for e in emails] == ["reader@example.org"]
    _, messages = await stored_messages(api)
    message = messages["reader@example.org"]
    assert list(message.iter_attachments()) == [] and message["Reply-To"] == "help@example.com"
    assert message["From"] == "Shop <hello@example.com>"
    contact = await api.db.read(contact_store.get_contact_by_email, api.project_id, "reader@example.org")
    assert contact.subscribed is True


@pytest.mark.parametrize("attachments", [{"filename": "a.txt", "content": "YQ=="}, {"0": {}}, "none", 0, True])
async def test_attachments_other_than_a_list_or_the_empty_object_are_refused(api, sender, attachments):
    status, body = await api.call("POST", "/api/v1/send", json={"to": "a@example.org", "subject": "s", "body": "b",
                                                               "attachments": attachments})
    assert status == 422, body
    assert body["error"]["code"] == "VALIDATION_ERROR" and body["error"]["errors"][0]["field"] == "attachments"
    assert await api.db.read(email_store.list_emails, api.project_id) == []


async def test_unverified_sender_is_refused(api, sender):
    status, body = await send(api, **{"from": "me@unverified.example"})
    assert status == 422
    assert body["error"]["errors"] == [{"field": "from", "code": "unverified_domain",
                                        "message": "unverified.example is not a verified domain of this project"}]
    assert await api.db.read(email_store.list_emails, api.project_id) == []
    assert await api.db.read(contact_store.get_contact_by_email, api.project_id, "ann@example.org") is None


async def test_no_domain_at_all_is_refused(api):
    status, body = await send(api)
    assert status == 422 and body["error"]["errors"][0]["code"] == "unverified_domain"


async def test_idempotency_key(api, sender):
    headers = {"Idempotency-Key": "order-42"}
    status, first = await api.call("POST", "/v1/send", json={"to": "a@example.org", "subject": "s", "body": "b"},
                                   headers=headers)
    assert status == 200
    status, again = await api.call("POST", "/v1/send", json={"to": "a@example.org", "subject": "s", "body": "b"},
                                   headers=headers)
    assert status == 200 and again["data"] == first["data"]
    assert len(await api.db.read(email_store.list_emails, api.project_id)) == 1
    status, body = await api.call("POST", "/v1/send", json={"to": "a@example.org", "subject": "other", "body": "b"},
                                  headers=headers)
    assert status == 409 and body["error"]["code"] == "CONFLICT"
    status, _ = await api.call("POST", "/v1/send", json={"to": "a@example.org", "subject": "s", "body": "b"},
                               headers={"Idempotency-Key": "x" * 300})
    assert status == 422


@pytest.mark.parametrize(("payload", "field", "code"), [
    ({"to": None}, "to", "invalid_type"),
    ({"to": "nope"}, "to.0", "invalid_string"),
    ({"to": ["a@example.org", "nope"]}, "to.1", "invalid_string"),
    ({"to": []}, "to", "too_small"),
    ({"to": [f"u{i}@example.org" for i in range(51)]}, "to", "too_big"),
    ({"subject": None, "body": None}, "body", "value_error"),
    ({"subject": 5}, "subject", "invalid_type"),
    ({"from": "bad"}, "from", "invalid_string"),
    ({"reply": "bad"}, "reply", "invalid_string"),
    ({"headers": {"X-Evil": "a\r\nBcc: victim@example.org"}}, "headers.X-Evil", "invalid_header_value"),
    ({"headers": {"Bcc": "victim@example.org"}}, "headers.Bcc", "protected_header"),
    ({"headers": {"dkim-signature": "x"}}, "headers.dkim-signature", "protected_header"),
    ({"headers": {"Bad Name": "x"}}, "headers.Bad Name", "invalid_header"),
    ({"headers": {"X-N": 5}}, "headers.X-N", "invalid_type"),
    ({"attachments": [{"filename": "a", "content": "!!notbase64!!"}]}, "attachments.0.content", "invalid_base64"),
    ({"attachments": [{"filename": "a", "content": "YQ=="}] * 6}, "attachments", "too_big"),
    ({"attachments": [{"filename": "../etc/passwd", "content": "YQ=="}]}, "attachments.0.filename", "value_error"),
    ({"attachments": [{"filename": "a", "content": "YQ==", "contentType": "text/html\r\nX: y"}]},
     "attachments.0.contentType", "string_pattern_mismatch"),
    ({"subscribed": "yes"}, "subscribed", "invalid_type"),
])
async def test_send_validation(api, sender, payload, field, code):
    status, body = await send(api, **payload)
    assert status == 422, body
    assert (field, code) in [(e["field"], e["code"]) for e in body["error"]["errors"]], body["error"]["errors"]
    assert await api.db.read(email_store.list_emails, api.project_id) == []


async def test_send_needs_secret_key(api, sender):
    status, body = await api.call("POST", "/v1/send", key=api.pk,
                                  json={"to": "a@example.org", "subject": "s", "body": "b"})
    assert status == 403
    resp = await api.client.post("/v1/send", json={"to": "a@example.org", "subject": "s", "body": "b"})
    assert resp.status == 401


async def test_unknown_template_is_404(api, sender):
    status, body = await api.call("POST", "/v1/send", json={"to": "a@example.org", "template": "t1"})
    assert status == 404


async def test_every_path_records_the_envelope_sender_it_delivers_with(api, sender, tmp_path):
    """An API send, a campaign, a campaign's test copy and a workflow's send step all record the From
    address as their envelope sender (NULL before, for every one of them) and are delivered with it."""
    from tests.test_campaigns import add_contacts, create, deliver
    from tests.test_workflows_engine import _ended, make_template, make_workflow, scheduler_for, track_event, wait_for

    status, body = await send(api, to="api@example.org")
    assert status == 200, body
    await add_contacts(api, 2)
    news = await create(api, recipients=["reader0@example.org", "reader1@example.org"])
    status, body = await api.call("POST", f"/campaigns/{news['id']}/test", json={"emails": ["proof@example.org"]})
    assert status == 200, body
    status, body = await api.call("POST", f"/campaigns/{news['id']}/send", json={})
    assert status == 200, body
    workflow = await make_workflow(api, [{"id": "mail", "type": "send", "template": await make_template(api)}],
                                   ["signed-up"])
    scheduler = asyncio.create_task(scheduler_for(api).run())
    try:
        await track_event(api, "flow@example.org", "signed-up")
        assert await wait_for(lambda: _ended(api, workflow), 5)
    finally:
        scheduler.cancel()
        await asyncio.gather(scheduler, return_exceptions=True)
    folder = tmp_path / "outbox"
    await deliver(api, folder)

    rows = await api.db.read(email_store.list_emails, api.project_id)
    assert sorted((row.source, row.recipient, row.envelope_sender) for row in rows) == [
        ("api", "api@example.org", "hello@example.com"),
        ("campaign", "proof@example.org", "hello@example.com"),
        ("campaign", "reader0@example.org", "hello@example.com"),
        ("campaign", "reader1@example.org", "hello@example.com"),
        ("workflow", "flow@example.org", "hello@example.com")]
    assert {row.status for row in rows} == {"SENT"}
    written = [path.read_bytes() for path in folder.glob("*.eml")]
    assert len(written) == 5 and all(raw.startswith(b"Return-Path: <hello@example.com>\r\nDKIM-Signature: ")
                                     for raw in written)
