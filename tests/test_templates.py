"""Templates: CRUD over the API, deletes refused while a campaign uses one, and /v1/send with a template
(transactional as written, marketing with each recipient's own unsubscribe headers and footer), delivered
and DKIM-verified."""

from __future__ import annotations

import email
import json
import re
from email import policy

import dkim
import pytest

from api.context import LINKS
from pipeline.compose import MessageSpec
from pipeline.marketing.templates import template_spec
from storage import contacts as contact_store
from storage import emails as email_store
from storage.models import Campaign, Template
from tests.test_delivery import dns_for
from tests.test_header_injection import delivered, field_names

TEMPLATE = {"name": "Welcome", "subject": "Hi {{firstName ?? friend}}", "body": "<p>Hello {{firstName}}</p>"}
TOKEN = re.compile(r"/unsubscribe/([A-Za-z0-9_-]+\.[A-Za-z0-9_-]+)")


async def create(api, key=None, **fields):
    status, body = await api.call("POST", "/templates", key=key, json={**TEMPLATE, **fields})
    assert status == 201, body
    return body["data"]


async def send(api, **payload):
    payload.setdefault("to", "ann@example.org")
    return await api.call("POST", "/v1/send", json=payload)


def by_recipient(raws: list[bytes]) -> dict[str, email.message.EmailMessage]:
    messages = [email.message_from_bytes(raw, policy=policy.default) for raw in raws]
    return {str(m["To"]): m for m in messages}


def signed_headers(raw: bytes) -> list[str]:
    msg = email.message_from_bytes(raw, policy=policy.compat32)
    tags = dict(part.strip().split("=", 1) for part in msg["DKIM-Signature"].replace("\r\n", "").split(";")
                if "=" in part)
    return [name.strip().lower() for name in re.sub(r"\s", "", tags["h"]).split(":")]


async def contact_id(api, address):
    return (await api.db.read(contact_store.get_contact_by_email, api.project_id, address)).id


# --- CRUD -------------------------------------------------------------------------------------------------


async def test_create_get_and_defaults(api):
    status, body = await api.call("POST", "/templates", json=TEMPLATE)
    assert status == 201, body
    made = body["data"]
    assert set(made) == {"id", "name", "subject", "body", "type", "style", "from", "fromName", "reply", "projectId",
                         "createdAt", "updatedAt"}
    assert made["type"] == "MARKETING" and made["style"] == "PLUNK"
    assert made["from"] is None and made["fromName"] is None and made["reply"] is None
    assert made["projectId"] == api.project_id and made["createdAt"] == made["updatedAt"]
    assert made["createdAt"].endswith("Z")
    for path in (f"/templates/{made['id']}", f"/v1/templates/{made['id']}"):
        status, body = await api.call("GET", path)
        assert status == 200 and body["data"] == made
    status, flat = await api.call("GET", f"/api/v1/templates/{made['id']}")
    assert status == 200 and flat == {"success": True, **made}


async def test_create_with_every_field(api):
    made = await create(api, type="TRANSACTIONAL", style="HTML", **{"from": "News@Example.com"},
                        fromName="News", reply="help@example.com")
    assert (made["type"], made["style"], made["from"], made["fromName"], made["reply"]) == (
        "TRANSACTIONAL", "HTML", "news@example.com", "News", "help@example.com")


async def test_patch_changes_only_what_is_given_and_null_clears(api):
    made = await create(api, **{"from": "news@example.com"}, fromName="News", reply="help@example.com")
    status, body = await api.call("PATCH", f"/templates/{made['id']}",
                                  json={"subject": "New subject", "fromName": None, "style": "HTML"})
    assert status == 200, body
    patched = body["data"]
    assert patched["subject"] == "New subject" and patched["style"] == "HTML" and patched["fromName"] is None
    assert patched["name"] == made["name"] and patched["body"] == made["body"] and patched["type"] == "MARKETING"
    assert patched["from"] == "news@example.com" and patched["reply"] == "help@example.com"
    assert patched["updatedAt"] > made["updatedAt"] and patched["createdAt"] == made["createdAt"]
    status, body = await api.call("PATCH", f"/v1/templates/{made['id']}", json={})
    assert status == 200 and body["data"] == patched
    status, body = await api.call("GET", f"/templates/{made['id']}")
    assert body["data"] == patched


@pytest.mark.parametrize("field", ["name", "subject", "body", "type", "style"])
async def test_patch_refuses_null_for_required_fields(api, field):
    made = await create(api)
    status, body = await api.call("PATCH", f"/templates/{made['id']}", json={field: None})
    assert status == 422, body
    assert [e["field"] for e in body["error"]["errors"]] == [field]


async def test_put_replaces_the_whole_template(api):
    made = await create(api, type="TRANSACTIONAL", fromName="News", reply="help@example.com")
    status, body = await api.call("PUT", f"/templates/{made['id']}",
                                  json={"name": "Other", "subject": "S", "body": "B"})
    assert status == 200, body
    replaced = body["data"]
    assert (replaced["name"], replaced["subject"], replaced["body"]) == ("Other", "S", "B")
    assert replaced["type"] == "MARKETING" and replaced["style"] == "PLUNK"
    assert replaced["fromName"] is None and replaced["reply"] is None and replaced["id"] == made["id"]
    status, body = await api.call("PUT", f"/templates/{made['id']}", json={"name": "Other"})
    assert status == 422
    assert {e["field"] for e in body["error"]["errors"]} == {"subject", "body"}


async def test_delete(api):
    made = await create(api)
    status, body = await api.call("DELETE", f"/templates/{made['id']}")
    assert status == 200 and body["data"] == made
    for method in ("GET", "DELETE", "PATCH"):
        status, body = await api.call(method, f"/templates/{made['id']}", json={})
        assert status == 404 and body["error"]["code"] == "NOT_FOUND", (method, body)


async def test_list_is_paginated_newest_first(api):
    made = [await create(api, name=f"t{i}") for i in range(5)]
    other_project, other_sk, _ = await api.new_project()
    await create(api, key=other_sk, name="theirs")
    status, body = await api.call("GET", "/templates?limit=2")
    assert status == 200, body
    page = body["data"]
    assert [t["name"] for t in page["items"]] == ["t4", "t3"]
    assert page["hasMore"] is True and page["total"] == 5 and page["nextCursor"] == page["items"][-1]["id"]
    seen = [t["id"] for t in page["items"]]
    while page["hasMore"]:
        status, body = await api.call("GET", f"/v1/templates?limit=2&cursor={page['nextCursor']}")
        assert status == 200, body
        page = body["data"]
        seen += [t["id"] for t in page["items"]]
    assert seen == [t["id"] for t in reversed(made)]
    assert page["nextCursor"] is None
    status, plain = await api.call("GET", "/api/v1/templates")
    assert status == 200 and [t["id"] for t in plain] == seen
    status, body = await api.call("GET", "/templates?limit=0")
    assert status == 422
    status, body = await api.call("GET", "/templates?cursor=nope")
    assert status == 422


async def test_other_projects_template_is_not_found(api, sender):
    _, other_sk, _ = await api.new_project()
    theirs = await create(api, key=other_sk)
    for method, payload in (("GET", None), ("PATCH", {"name": "x"}), ("PUT", TEMPLATE), ("DELETE", None)):
        status, body = await api.call(method, f"/templates/{theirs['id']}", json=payload)
        assert status == 404 and body["error"]["code"] == "NOT_FOUND", (method, body)
    status, body = await send(api, template=theirs["id"])
    assert status == 404 and body["error"]["code"] == "NOT_FOUND"
    assert body["message"] == f"Template {theirs['id']} not found"
    status, body = await api.call("GET", f"/templates/{theirs['id']}", key=other_sk)
    assert status == 200 and body["data"]["name"] == "Welcome", "still there for its own project"


async def test_a_body_over_five_million_characters_is_refused(api):
    payload = json.dumps({**TEMPLATE, "body": "x" * 6_000_000})
    status, body = await api.call("POST", "/templates", data=payload, headers={"Content-Type": "application/json"})
    assert status == 422, body
    assert [(e["field"], e["code"]) for e in body["error"]["errors"]] == [("body", "too_big")]
    status, body = await api.call("POST", "/templates", json={**TEMPLATE, "body": "y" * 5_000_001})
    assert status == 422 and body["error"]["errors"][0]["field"] == "body"
    made = await create(api, body="z" * 5_000_000)
    status, body = await api.call("PATCH", f"/templates/{made['id']}", json={"body": "y" * 5_000_001})
    assert status == 422 and body["error"]["errors"][0]["field"] == "body"
    status, body = await api.call("GET", f"/templates/{made['id']}")
    assert len(body["data"]["body"]) == 5_000_000


@pytest.mark.parametrize(("payload", "field", "code"), [
    ({"type": "marketing"}, "type", "invalid_enum_value"),
    ({"type": "NEWSLETTER"}, "type", "invalid_enum_value"),
    ({"style": "MJML"}, "style", "invalid_enum_value"),
    ({"style": None}, "style", "invalid_enum_value"),
    ({"name": ""}, "name", "too_small"),
    ({"name": "n" * 201}, "name", "too_big"),
    ({"name": 5}, "name", "invalid_type"),
    ({"subject": "s" * 999}, "subject", "too_big"),
    ({"subject": "Hi\r\nBcc: spy@evil.example"}, "subject", "invalid_header_value"),
    ({"from": "nope"}, "from", "invalid_string"),
    ({"from": "a@example.test"}, "from", "invalid_string"),
    ({"reply": "help@example.com\nBcc: x@example.com"}, "reply", "invalid_header_value"),
    ({"fromName": "News\r\nBcc: x@example.com"}, "fromName", "invalid_header_value"),
    ({"fromName": "n" * 201}, "fromName", "too_big"),
])
async def test_create_validation(api, payload, field, code):
    status, body = await api.call("POST", "/templates", json={**TEMPLATE, **payload})
    assert status == 422, body
    assert (field, code) in [(e["field"], e["code"]) for e in body["error"]["errors"]], body["error"]["errors"]
    status, body = await api.call("GET", "/templates")
    assert body["data"]["total"] == 0


async def test_bad_requests(api):
    made = await create(api)
    for method, path in (("POST", "/templates"), ("PATCH", f"/templates/{made['id']}"),
                         ("PUT", f"/templates/{made['id']}")):
        resp = await api.client.request(method, path, data="{not json", headers={**api.auth(),
                                                                                 "Content-Type": "application/json"})
        assert resp.status == 400 and (await resp.json())["error"]["code"] == "BAD_REQUEST", (method, path)
        status, body = await api.call(method, path, json=[TEMPLATE])
        assert status == 422, (method, path, body)
    for method, path in (("GET", "/templates"), ("POST", "/templates"), ("GET", f"/templates/{made['id']}"),
                         ("PATCH", f"/templates/{made['id']}"), ("PUT", f"/templates/{made['id']}"),
                         ("DELETE", f"/templates/{made['id']}")):
        resp = await api.client.request(method, path, json=TEMPLATE)
        assert resp.status == 401, (method, path)
        status, body = await api.call(method, path, key=api.pk, json=TEMPLATE)
        assert status == 403 and body["error"]["code"] == "FORBIDDEN", (method, path)
    status, body = await api.call("GET", f"/templates/{made['id']}")
    assert status == 200 and body["data"] == made


async def test_delete_is_refused_while_a_campaign_uses_the_template(api):
    made = await create(api)
    spare = await create(api, name="spare")

    def add_campaigns(session):
        rows = [Campaign(project_id=api.project_id, name=name, template_id=made["id"]) for name in ("Spring", "Fall")]
        session.add_all(rows)
        session.flush()
        return [row.id for row in rows]

    campaign_ids = await api.db.write(add_campaigns)
    status, body = await api.call("DELETE", f"/templates/{made['id']}")
    assert status == 409 and body["error"]["code"] == "CONFLICT", body
    message = body["error"]["message"]
    assert "Spring" in message and "Fall" in message and all(i in message for i in campaign_ids), message
    status, body = await api.call("GET", f"/templates/{made['id']}")
    assert status == 200
    status, _ = await api.call("DELETE", f"/templates/{spare['id']}")
    assert status == 200, "an unused template of the same project can go"

    def drop_campaigns(session):
        for campaign_id in campaign_ids:
            session.delete(session.get(Campaign, campaign_id))

    await api.db.write(drop_campaigns)
    status, body = await api.call("DELETE", f"/templates/{made['id']}")
    assert status == 200, body


# --- /v1/send with a template -------------------------------------------------------------------------------


async def test_send_with_a_transactional_html_template(api, sender, tmp_path):
    await api.call("POST", "/contacts", json={"email": "ann@example.org", "data": {"firstName": "Ann"}})
    body = ('<html><body><p>Hello {{firstName ?? there}}, order {{order}} for {{plunk_email}}'
            '</p><p>[{{missing}}]</p></body></html>')
    made = await create(api, type="TRANSACTIONAL", style="HTML", subject="Order {{order}} {{missing ?? ok}}",
                        body=body)
    status, reply = await send(api, to=["ann@example.org", "bob@example.org"], template=made["id"],
                               data={"order": "A-1"})
    assert status == 200, reply
    assert [e["contact"]["email"] for e in reply["data"]["emails"]] == ["ann@example.org", "bob@example.org"]
    rows = await api.db.read(email_store.list_emails, api.project_id)
    assert {row.subject for row in rows} == {made["subject"]}
    raws = await delivered(api, tmp_path)
    messages = by_recipient(raws)
    ann, bob = messages["ann@example.org"], messages["bob@example.org"]
    assert ann["Subject"] == "Order A-1 ok" and ann["From"] == "Test <hello@example.com>"
    assert ann["List-Unsubscribe"] is None and ann["List-Unsubscribe-Post"] is None
    assert ann.get_body(("html",)).get_content().strip() == (
        "<html><body><p>Hello Ann, order A-1 for ann@example.org</p><p>[]</p></body></html>")
    assert "Hello there, order A-1 for bob@example.org" in bob.get_body(("html",)).get_content()
    assert "/unsubscribe/" not in bob.get_body(("html",)).get_content()
    for raw in raws:
        assert dkim.verify(raw, dnsfunc=dns_for(sender))


async def test_send_with_a_marketing_plunk_template(api, sender, tmp_path):
    made = await create(api, subject="News for {{plunk_email}}", body="Hello {{firstName ?? reader}}\n\nBye")
    recipients = ["ann@example.org", "bob@example.org", "cy@example.org"]
    status, reply = await send(api, to=recipients, template=made["id"], subscribed=True)
    assert status == 200, reply
    raws = await delivered(api, tmp_path)
    assert len(raws) == 3
    signer = api.client.app[LINKS]
    tokens = set()
    for raw in raws:
        msg = email.message_from_bytes(raw, policy=policy.default)
        recipient = str(msg["To"])
        contact = await contact_id(api, recipient)
        assert msg["Subject"] == f"News for {recipient}"
        [unsubscribe_header] = TOKEN.findall(str(msg["List-Unsubscribe"]))
        assert signer.verify(unsubscribe_header).contact_id == contact
        assert "mailto:hello@example.com?subject=unsubscribe" in str(msg["List-Unsubscribe"])
        assert msg["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
        html = msg.get_body(("html",)).get_content()
        assert "<p>Hello reader</p>" in html and "<p>Bye</p>" in html and "Unsubscribe</a>" in html
        footer_tokens = set(TOKEN.findall(html))
        assert footer_tokens == {unsubscribe_header}, "the footer links to this recipient's own contact"
        tokens |= footer_tokens
        assert dkim.verify(raw, dnsfunc=dns_for(sender))
        assert {"list-unsubscribe", "list-unsubscribe-post"} <= set(signed_headers(raw))
    assert len(tokens) == 3


async def test_marketing_template_goes_only_to_subscribed_contacts(api, sender, tmp_path):
    """Marketing mail needs consent: an unsubscribed contact, or a new address sent without
    `subscribed: true`, gets an email record marked SKIPPED and nothing is delivered; transactional
    templates go to everyone, as plain sends do."""
    marketing = await create(api)
    transactional = await create(api, name="Receipt", type="TRANSACTIONAL")
    status, _ = await api.call("POST", "/contacts", json={"email": "left@example.org", "subscribed": False})
    assert status == 201
    status, _ = await api.call("POST", "/contacts", json={"email": "stays@example.org", "subscribed": True})
    assert status == 201
    status, reply = await send(api, to=["left@example.org", "stays@example.org", "new@example.org"],
                               template=marketing["id"])
    assert status == 200 and len(reply["data"]["emails"]) == 3, reply
    status, reply = await send(api, to="left@example.org", template=transactional["id"])
    assert status == 200
    delivered_to = sorted(str(email.message_from_bytes(raw, policy=policy.default)["To"])
                          for raw in await delivered(api, tmp_path))
    assert delivered_to == ["left@example.org", "stays@example.org"]
    rows = await api.db.read(email_store.list_emails, api.project_id)
    skipped = sorted(row.recipient for row in rows if row.status == "SKIPPED")
    assert skipped == ["left@example.org", "new@example.org"]
    assert all(row.error == email_store.SKIPPED_UNSUBSCRIBED for row in rows if row.status == "SKIPPED")


async def test_template_sender_fields_and_request_overrides(api, sender, tmp_path):
    made = await create(api, type="TRANSACTIONAL", style="HTML", **{"from": "news@example.com"}, fromName="News",
                        reply="help@example.com")
    status, reply = await send(api, template=made["id"])
    assert status == 200, reply
    status, reply = await send(api, to="bob@example.org", template=made["id"], subject="Custom {{plunk_email}}",
                               body="<p>Own body</p>", name="Shop", reply="shop@example.com",
                               headers={"X-Tag": "t"}, **{"from": "shop@example.com"})
    assert status == 200, reply
    messages = by_recipient(await delivered(api, tmp_path))
    ann, bob = messages["ann@example.org"], messages["bob@example.org"]
    assert ann["From"] == "News <news@example.com>" and ann["Reply-To"] == "help@example.com"
    assert ann["Subject"] == "Hi friend"
    assert bob["From"] == "Shop <shop@example.com>" and bob["Reply-To"] == "shop@example.com"
    assert bob["Subject"] == "Custom bob@example.org" and bob["X-Tag"] == "t"
    assert bob.get_body(("html",)).get_content().strip() == "<p>Own body</p>"
    rows = {row.recipient: row for row in await api.db.read(email_store.list_emails, api.project_id)}
    assert rows["ann@example.org"].sender == "news@example.com" and rows["bob@example.org"].sender == "shop@example.com"


async def test_template_from_an_unverified_domain_is_refused_at_send(api, sender):
    made = await create(api, **{"from": "news@unverified.example"})
    status, body = await send(api, template=made["id"])
    assert status == 422
    assert [(e["field"], e["code"]) for e in body["error"]["errors"]] == [("from", "unverified_domain")]
    assert await api.db.read(email_store.list_emails, api.project_id) == []


async def test_marketing_template_refuses_its_own_unsubscribe_headers(api, sender):
    made = await create(api)
    status, body = await send(api, template=made["id"], headers={"List-Unsubscribe": "<https://x.example/u>"})
    assert status == 422
    assert [(e["field"], e["code"]) for e in body["error"]["errors"]] == [("headers.List-Unsubscribe",
                                                                           "protected_header")]
    transactional = await create(api, type="TRANSACTIONAL")
    status, body = await send(api, template=transactional["id"], headers={"List-Unsubscribe": "<https://x.example/u>"})
    assert status == 200, body


async def test_send_with_template_keeps_idempotency_and_attachments(api, sender, tmp_path):
    made = await create(api, type="TRANSACTIONAL", style="HTML")
    payload = {"to": "ann@example.org", "template": made["id"],
               "attachments": [{"filename": "n.txt", "content": "bm90ZQ==", "contentType": "text/plain"}]}
    headers = {"Idempotency-Key": "tpl-1"}
    status, first = await api.call("POST", "/v1/send", json=payload, headers=headers)
    assert status == 200, first
    status, again = await api.call("POST", "/v1/send", json=payload, headers=headers)
    assert status == 200 and again["data"] == first["data"]
    status, _ = await api.call("POST", "/v1/send", json={**payload, "to": "bob@example.org"}, headers=headers)
    assert status == 409
    [raw] = await delivered(api, tmp_path)
    msg = email.message_from_bytes(raw, policy=policy.default)
    assert [part.get_filename() for part in msg.iter_attachments()] == ["n.txt"]


async def test_hostile_contact_data_never_makes_a_header(api, sender, tmp_path):
    status, body = await api.call("POST", "/v1/track", key=api.pk, json={
        "email": "ann@example.org", "event": "signup", "data": {"x": "\r\nBcc: evil@x.example", "y": "a\nX-Evil: 1"}})
    assert status == 200, body
    for kind in ("MARKETING", "TRANSACTIONAL"):
        made = await create(api, type=kind, subject="Hi {{x}} {{y}}", body="<p>{{x}}</p>")
        status, body = await send(api, template=made["id"], headers={"X-Tag": "{{x}}"})
        assert status == 200, body
    raws = await delivered(api, tmp_path)
    assert len(raws) == 2
    for raw in raws:
        head = raw[:raw.index(b"\r\n\r\n")].lower()
        assert b"\nbcc:" not in head and b"\nx-evil:" not in head
        names = field_names(raw)
        assert "Bcc" not in names and "X-Evil" not in names and len(names) == len(set(names)), names
        msg = email.message_from_bytes(raw, policy=policy.default)
        assert msg["Subject"] == "Hi   Bcc: evil@x.example a X-Evil: 1" and msg["Bcc"] is None
        assert dkim.verify(raw, dnsfunc=dns_for(sender))


async def test_send_with_an_unknown_template_is_404(api, sender):
    status, body = await send(api, template="00000000-0000-7000-8000-000000000000", subject="s", body="b")
    assert status == 404 and body["error"]["code"] == "NOT_FOUND"
    assert await api.db.read(email_store.list_emails, api.project_id) == []


# --- template_spec, as campaigns call it ---------------------------------------------------------------------


def test_template_spec_rules():
    template = Template(id="t", project_id="p", name="n", subject="S", body="B", type="TRANSACTIONAL", style="HTML",
                        from_email=None, from_name="Tpl", reply_to=None)
    spec = template_spec(template, ("hello@example.com", "Project"), None)
    assert isinstance(spec, MessageSpec)
    assert (spec.from_email, spec.from_name, spec.subject, spec.body, spec.reply_to, spec.style, spec.links) == (
        "hello@example.com", "Tpl", "S", "B", None, "HTML", None)
    spec = template_spec(template, ("hello@example.com", "Project"), None, from_name="", subject="", body="")
    assert (spec.from_name, spec.subject, spec.body) == ("", "", ""), "given empty values are values"
    template.type, template.style = "MARKETING", "PLUNK"
    with pytest.raises(ValueError):
        template_spec(template, ("hello@example.com", "Project"), None)
